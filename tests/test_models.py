"""The paper's models and the other families: architecture, shapes, registry."""

import pytest
import torch
import torch.nn as nn

from efcn_sparse import get_model, models


def _convs(m):
    return [x for x in m.modules() if isinstance(x, nn.Conv2d)]


def test_paper_cnn_matches_the_authors_layers():
    net = models.paper_cnn(width=64, in_channels=3, image_size=32, num_classes=10)
    kinds = [type(x).__name__ for x in net]
    assert kinds == ["ZeroPad2d", "Conv2d", "ReLU", "MaxPool2d"] * 3 + ["Flatten", "Linear"]
    pads = [x.padding for x in net if isinstance(x, nn.ZeroPad2d)]
    assert pads == [(2, 2, 2, 2), (2, 2, 2, 2), (1, 1, 1, 1)]
    c1, c2, c3 = _convs(net)
    assert (c1.in_channels, c1.out_channels, c1.kernel_size, c1.stride, c1.padding) == (3, 64, (4, 4), (2, 2), (0, 0))
    assert (c2.in_channels, c2.out_channels, c2.kernel_size, c2.stride) == (64, 64, (5, 5), (1, 1))
    assert (c3.in_channels, c3.out_channels, c3.kernel_size) == (64, 64, (3, 3))
    assert all(p.kernel_size == 3 and p.stride == 2 for p in net if isinstance(p, nn.MaxPool2d))
    assert net[-1].in_features == 64 and net[-1].out_features == 10  # 32x32 ends at 1x1


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_paper_cnn_forward_shapes(shape):
    net = models.paper_cnn(width=8, in_channels=shape[0], image_size=shape[1], num_classes=7)
    assert net(torch.randn(2, *shape)).shape == (2, 7)


def test_paper_cnn_rejects_too_small_images():
    with pytest.raises(ValueError, match="too small"):
        models.paper_cnn(image_size=12)


def test_alexnet_matches_the_authors_variant():
    net = models.alexnet()
    convs = _convs(net)
    assert [c.out_channels for c in convs] == [64, 192, 384, 256, 256]
    assert [(c.kernel_size[0], c.stride[0], c.padding[0]) for c in convs] == [(4, 2, 2), (5, 1, 2), (3, 1, 1), (3, 1, 1), (3, 1, 1)]
    lin = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lin] == [(256, 512), (512, 512), (512, 10)]
    assert sum(isinstance(m, nn.Dropout) for m in net.modules()) == 2
    assert sum(isinstance(m, nn.MaxPool2d) for m in net.modules()) == 3
    small = models.alexnet(width=4, hidden=16)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_resnet18_cifar_layout():
    net = models.resnet18(width=4, num_classes=5)
    convs = _convs(net)
    assert len(convs) == 1 + 16 + 3  # stem, 8 blocks x 2, three 1x1 shortcuts
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)
    assert not any(isinstance(m, nn.MaxPool2d) for m in net.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 20
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 5)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_vgg_and_small_images():
    net = models.vgg(width=2, image_size=8)
    assert net(torch.randn(2, 3, 8, 8)).shape == (2, 10)
    assert len(_convs(net)) == 8
    assert models.vgg(width=2, image_size=32)(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_mobilenet_block_has_depthwise_and_pointwise_convs():
    blk = models.MobileNetBlock(8, 8, stride=1, expand=2)
    dw = blk.depthwise[0]
    assert dw.groups == dw.in_channels == dw.out_channels == 16
    assert blk.expand[0].kernel_size == (1, 1) and blk.project[0].kernel_size == (1, 1)
    assert blk.residual
    x = torch.randn(2, 8, 6, 6)
    assert blk(x).shape == x.shape
    assert models.MobileNetBlock(8, 16, stride=2)(x).shape == (2, 16, 3, 3)


def test_registry():
    for name in ("skinny", "alexnet", "resnet18", "vgg", "mobilenet"):
        assert name in models.MODELS
    net = get_model("skinny", width=4, in_channels=1, image_size=28, num_classes=3)
    assert net(torch.randn(1, 1, 28, 28)).shape == (1, 3)
    assert isinstance(get_model("ResNet18", width=2), models.ResNet)
    with pytest.raises(ValueError, match="unknown model 'lenet'"):
        get_model("lenet")
    with pytest.raises(TypeError, match="get_model"):
        get_model("vgg", depth=3)
