"""The paper's models and a few standard families, as ordinary CNNs (embed them with ``efcn_sparse.embed``).

* ``paper_cnn`` ("skinny"): the authors' small CNN, with explicit ``nn.ZeroPad2d`` layers.
* ``alexnet``: the authors' AlexNet variant for 32x32 inputs.
* ``resnet18``: ResNet-18 in the CIFAR layout (3x3 stem, no max-pool).
* ``vgg``: a small VGG (VGG-11 layout by default).
* ``MobileNetBlock`` / ``mobilenet``: inverted-residual blocks with depthwise convs.

Every constructor takes ``width`` (channels of the first stage), ``in_channels``, ``image_size`` and
``num_classes``, so tests can build tiny versions; ``get_model(name, **kw)`` is the registry.
Classifier inputs are flattened with ``nn.Flatten`` (an eFCN returns channels_last views, which
``x.view(B, -1)`` would reject).
"""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Union

import torch.nn as nn

__all__ = ["paper_cnn", "alexnet", "resnet18", "vgg", "BasicBlock", "ResNet", "MobileNetBlock", "mobilenet",
           "get_model", "MODELS"]


def _conv_out(n: int, k: int, s: int = 1, p: int = 0) -> int:
    return (n + 2 * p - k) // s + 1


def _check_size(image_size: int, n: int, what: str) -> None:
    if n < 1:
        raise ValueError(f"image_size={image_size} is too small for {what}")


# ----------------------------------------------------------------------------------------- paper
def paper_cnn(width: int = 64, in_channels: int = 1, image_size: int = 28, num_classes: int = 10) -> nn.Sequential:
    """The authors' small CNN ("SkinnyCNNPrime"): three (ZeroPad, Conv, ReLU, MaxPool 3/2) stages and a Linear.

    1x28x28 (Fashion-MNIST) and 3x32x32 (CIFAR-10) both end at 1x1 pixels.
    """
    ch = width
    layers = [nn.ZeroPad2d(2), nn.Conv2d(in_channels, ch, 4, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2),
              nn.ZeroPad2d(2), nn.Conv2d(ch, ch, 5), nn.ReLU(), nn.MaxPool2d(3, 2),
              nn.ZeroPad2d(1), nn.Conv2d(ch, ch, 3), nn.ReLU(), nn.MaxPool2d(3, 2)]
    s = image_size
    for k, st, p in ((4, 2, 2), (5, 1, 2), (3, 1, 1)):
        s = _conv_out(_conv_out(s, k, st, p), 3, 2)
        _check_size(image_size, s, "paper_cnn (three conv + max-pool 3/2 stages)")
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(ch * s * s, num_classes))


def alexnet(in_channels: int = 3, image_size: int = 32, num_classes: int = 10, width: int = 64,
            hidden: int = 512, dropout: float = 0.5) -> nn.Sequential:
    """The authors' AlexNet for 32x32 inputs: convs of width*(1, 3, 6, 4, 4) channels (64, 192, 384,
    256, 256 at width=64), max-pools 3/2, then Dropout, Linear, ReLU, Dropout, Linear, ReLU, Linear."""
    c1, c2, c3, c4, c5 = (width * m for m in (1, 3, 6, 4, 4))
    features = [nn.Conv2d(in_channels, c1, 4, stride=2, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(c1, c2, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
                nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(),
                nn.Conv2d(c3, c4, 3, padding=1), nn.ReLU(),
                nn.Conv2d(c4, c5, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2)]
    s = _conv_out(_conv_out(image_size, 4, 2, 2), 3, 2)
    s = _conv_out(_conv_out(s, 5, 1, 2), 3, 2)
    s = _conv_out(s, 3, 2)
    _check_size(image_size, s, "alexnet (three max-pools 3/2)")
    classifier = [nn.Flatten(), nn.Dropout(dropout), nn.Linear(c5 * s * s, hidden), nn.ReLU(),
                  nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)]
    return nn.Sequential(*features, *classifier)


# ----------------------------------------------------------------------------------------- resnet
class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 convs with BatchNorm, identity or 1x1-conv shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-layout ResNet: 3x3 stem (no max-pool), four stages, global average pool, Linear."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), width: int = 64, in_channels: int = 3,
                 num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            stages.append(nn.Sequential(*[BasicBlock(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                                          for j in range(n)]))
            cin = cout
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.flatten(self.pool(x)))


def resnet18(in_channels: int = 3, num_classes: int = 10, width: int = 64, image_size: Optional[int] = None) -> ResNet:
    """ResNet-18, CIFAR layout (any image size >= 8; ``image_size`` is accepted for a uniform API)."""
    if image_size is not None:
        _check_size(image_size, image_size // 8, "resnet18 (three stride-2 stages)")
    return ResNet((2, 2, 2, 2), width, in_channels, num_classes)


# ----------------------------------------------------------------------------------------- vgg
VGG11 = (1, "M", 2, "M", 4, 4, "M", 8, 8, "M", 8, 8, "M")


def vgg(width: int = 64, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
        cfg: Sequence[Union[int, str]] = VGG11, batch_norm: bool = True) -> nn.Sequential:
    """A small VGG: 3x3 convs (``width`` x the cfg's multipliers) with BatchNorm and ReLU, 2x2 max-pools
    ("M"; skipped once the image is down to 1 pixel, so small images work), Flatten, Linear."""
    layers, c, s = [], in_channels, image_size
    for v in cfg:
        if v == "M":
            if s >= 2:
                layers.append(nn.MaxPool2d(2))
                s //= 2
            continue
        layers += [nn.Conv2d(c, width * int(v), 3, padding=1, bias=not batch_norm)]
        layers += [nn.BatchNorm2d(width * int(v))] if batch_norm else []
        layers += [nn.ReLU()]
        c = width * int(v)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * s * s, num_classes))


# ----------------------------------------------------------------------------------------- mobilenet
class MobileNetBlock(nn.Module):
    """MobileNet-v2 inverted residual: 1x1 expand, 3x3 depthwise (groups = channels), 1x1 project,
    BatchNorm after each, ReLU6 after the first two; residual when the shape is kept."""

    def __init__(self, cin: int, cout: int, stride: int = 1, expand: int = 2):
        super().__init__()
        hidden = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6())
        self.depthwise = nn.Sequential(nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
                                       nn.BatchNorm2d(hidden), nn.ReLU6())
        self.project = nn.Sequential(nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.depthwise(self.expand(x)))
        return x + y if self.residual else y


def mobilenet(width: int = 16, in_channels: int = 3, image_size: int = 32, num_classes: int = 10,
              expand: int = 2) -> nn.Sequential:
    """A tiny MobileNet-style net: stem conv, three inverted-residual blocks, average pool, Linear."""
    w = width
    return nn.Sequential(
        nn.Conv2d(in_channels, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU6(),
        MobileNetBlock(w, w, 1, expand), MobileNetBlock(w, 2 * w, 2, expand), MobileNetBlock(2 * w, 2 * w, 1, expand),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * w, num_classes))


# ----------------------------------------------------------------------------------------- registry
MODELS: Dict[str, Callable[..., nn.Module]] = {
    "skinny": paper_cnn,
    "alexnet": alexnet,
    "resnet18": resnet18,
    "vgg": vgg,
    "mobilenet": mobilenet,
}


def get_model(name: str, **kw) -> nn.Module:
    """Build a model by name ("skinny", "alexnet", "resnet18", "vgg", "mobilenet"), passing ``kw``
    (width, in_channels, image_size, num_classes, ...) to its constructor."""
    key = name.lower()
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(MODELS)}")
    try:
        return MODELS[key](**kw)
    except TypeError as e:
        raise TypeError(f"get_model({name!r}): {e}") from None
