"""Embed a ResNet-18 (CIFAR layout) as an eFCN: check it computes the same function, print its
memory summary and its deviation from the CNN subspace before and after one step in FCN space.

    python examples/embed_resnet18.py                      # width 16, 32x32 inputs, halo 0 (the eLCN)
    python examples/embed_resnet18.py --halo 1 --width 8
"""

import argparse

import torch
import torch.nn.functional as F

from efcn_sparse import deviation, embed, get_model, summary, to_cnn


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=16, help="channels of the first stage (64: the real ResNet-18)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--halo", default="0", help="0 (locally connected), an integer, or 'full' (huge for ResNet-18)")
    p.add_argument("--batch", type=int, default=4)
    args = p.parse_args(argv)
    halo = args.halo if args.halo == "full" else int(args.halo)
    shape = (3, args.image_size, args.image_size)

    torch.manual_seed(0)
    cnn = get_model("resnet18", width=args.width, image_size=args.image_size, num_classes=10)
    print(summary(cnn, shape, halo=halo))  # what the eFCN will store, counted before building it

    efcn = embed(cnn, shape, halo=halo)
    x = torch.randn(args.batch, *shape)
    cnn.eval(), efcn.eval()
    with torch.no_grad():
        ref, out = cnn(x), efcn(x)
    err = ((out - ref).abs().max() / ref.abs().max()).item()
    print(f"\nmax relative difference eFCN vs CNN (eval mode): {err:.2e}")

    def show(dev, title):
        print(f"\n{title}")
        print(f"{'layer':<26} {'||W||':>10} {'deviation':>10} {'off-local':>10} {'sharing':>10}")
        for path, s in dev["layers"].items():
            print(f"{path:<26} {s['weight_norm']:>10.4f} {s['deviation']:>10.2e} {s['offlocal_ratio']:>10.2e} "
                  f"{s['sharing_deviation']:>10.2e}")
        t = dev["total"]
        print(f"{'total':<26} {t['weight_norm']:>10.4f} {t['deviation']:>10.2e} {t['offlocal_ratio']:>10.2e} "
              f"{t['sharing_deviation']:>10.2e}")

    show(deviation(efcn), "deviation from the CNN subspace at embedding (0: it is the CNN)")

    # one SGD step in FCN space: weight sharing is lost (and locality too when halo > 0)
    efcn.train()
    opt = torch.optim.SGD(efcn.parameters(), lr=0.1)
    F.cross_entropy(efcn(x), torch.randint(0, 10, (args.batch,))).backward()
    opt.step()
    dev = deviation(efcn)
    show(dev, "after one SGD step in FCN space")
    back = to_cnn(efcn).eval()  # the nearest CNN (orthogonal projection)
    print(f"\nprojected back to a CNN: {sum(p.numel() for p in back.parameters())} parameters, "
          f"{sum(isinstance(m, torch.nn.Conv2d) for m in back.modules())} nn.Conv2d layers")
    return dev


if __name__ == "__main__":
    main()
