"""The relax-time protocol from Python: train a CNN, relax it into an eFCN at several times t_w,
keep training in FCN space, and compare with the CNN and an FCN trained from scratch.

    python examples/relax_protocol.py            # Fashion-MNIST subset, the paper's small CNN (minutes)
    python examples/relax_protocol.py --tiny     # synthetic data, a few seconds

The same run from the shell: ``efcn relax --width 16 --train-size 1000 ...``; ``efcn plot RUN_DIR``
redraws its figures.
"""

import argparse

from efcn_sparse.protocol import RelaxConfig, relax


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/example-relax")
    p.add_argument("--tiny", action="store_true", help="synthetic data and a tiny width: seconds")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST idx files (default: the Debian package)")
    args = p.parse_args(argv)

    if args.tiny:
        cfg = RelaxConfig(dataset="synthetic", image_size=28, train_size=64, test_size=32, width=2, epochs=2,
                          relax_times=[0, 2], batch_size=32, lr=0.05, momentum=0.9, threads=1)
    else:
        cfg = RelaxConfig(dataset="fashion-mnist", data_dir=args.data_dir, train_size=1000, test_size=1000,
                          model="skinny", width=16, epochs=6, relax_times=[0, 1, 2, 4], batch_size=50,
                          lr=0.02, momentum=0.9)
    result = relax(cfg, out=args.out, force=True, quiet=args.tiny)

    print(result["markdown"])
    # per arm: statistics over the seeds (one seed here) of the final accuracy (mean of the last 3 epochs)
    cnn = result["arms"]["cnn"]["final_test_acc"].mean
    for arm, r in result["arms"].items():
        if r["kind"] == "efcn":
            acc = r["final_test_acc"].mean
            print(f"relaxed at t_w={r['t_w']}: final test accuracy {100 * acc:.2f}% "
                  f"({100 * (acc - cnn):+.2f} vs the CNN), deviation {r['deviation'].mean:.4f}")
    for claim in result["claims"]:
        print(f"claim: {claim.text}: {claim.verdict} (n = {claim.n})")
    print(f"figures in {args.out}/figures")
    return result


if __name__ == "__main__":
    main()
