"""Figure 1 in kind on MNIST/LeNet: SmoothAdv vs ADREADV (2-step PGD, k = 8, one eps), sigma 0.5.

    python experiments/mnist_fig1_adv.py
"""

from __future__ import annotations

import argparse

from study import Run, add_common_arguments, curves_of, execute, write_summary

STUDY = "mnist_fig1_adv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sigma", type=float, default=0.5)
    parser.add_argument("--eps", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.2])
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.01,
                        help="the preset's 0.05 made ADREREG (lambda 0.3) diverge")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr-step", type=int, default=3)
    parser.add_argument("--eps-warmup", type=int, default=2)
    args = parser.parse_args()
    common = dict(preset="mnist-lenet", lr=args.lr, k=args.k, epochs=args.epochs,
                  lr_step=args.lr_step, sigma=args.sigma, eps=args.eps, steps=args.steps,
                  eps_warmup=args.eps_warmup)
    runs = [
        Run("smoothadv", dict(common, objective="smoothadv"), label="SmoothAdv"),
    ] + [Run(f"adreadv_l{lam}", dict(common, objective="adreadv", lam=lam),
             label=f"ADREADV λ={lam}") for lam in args.lams]
    files = execute(STUDY, runs, args)
    notes = (f"LeNet, sigma = {args.sigma}, k = {args.k}, {args.steps}-step L2 PGD on the soft "
             f"smoothed classifier with eps = {args.eps} (linear warm-up over "
             f"{args.eps_warmup} epochs), {args.epochs} epochs, lr {args.lr} / 10 after "
             f"{args.lr_step}. Autocast: {args.amp}. CERTIFY with alpha = "
             f"{args.alpha}, n0 = {args.n0}, n = {args.n}, every {args.skip}th test image, "
             f"{args.max} images.")
    sections = [("SmoothAdv vs ADREADV (CERTIFY)", curves_of(files), "fig1.png")]
    write_summary(STUDY, "MNIST: Figure 1 in kind", sections, notes, files,
                  [(files[0], files[1:])])


if __name__ == "__main__":
    main()
