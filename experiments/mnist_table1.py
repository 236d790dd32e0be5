"""Table 1 in kind on MNIST/LeNet: Basic vs ADREREG (lambda 0.1/0.2/0.3, k = 8) at three sigmas.

As in the paper's Table 1, Basic is Cohen's single-draw Gaussian augmentation (k = 1) and
ADREREG uses the single-draw l_per with the regulariser over k draws, so the ADRE term is the
only difference between the two. An ADREREG step costs k forward passes per example, so Basic
with the loss averaged over k draws is trained too (at --control-sigmas), as a compute control.

Also Figure 2 in kind: every result file holds CERTIFY and T-CERTIFY (paper and strict) from
the same samples, so the T-CERTIFY comparison is read from the same runs.

    python experiments/mnist_table1.py            # the full study (resumable)
    python experiments/mnist_table1.py --epochs 1 --max 20 --n 500   # a smoke run
"""

from __future__ import annotations

import argparse

from study import Run, add_common_arguments, curves_of, execute, write_summary

STUDY = "mnist_table1"


def runs(args: argparse.Namespace) -> list[Run]:
    common = dict(preset="mnist-lenet", lr=args.lr, epochs=args.epochs, lr_step=args.lr_step)
    adre = dict(common, objective="adre", k=args.k, single_draw=args.single_draw)
    found = []
    for sigma in args.sigmas:
        found.append(Run(f"basic_s{sigma}", dict(common, objective="gaussian", k=1, sigma=sigma),
                         label=f"Basic σ={sigma}"))
        if sigma in args.control_sigmas:
            found.append(Run(f"basic_k{args.k}_s{sigma}",
                             dict(common, objective="gaussian", k=args.k, sigma=sigma),
                             label=f"Basic k={args.k} σ={sigma}"))
        for lam in args.lams:
            found.append(Run(f"adre_s{sigma}_l{lam}", dict(adre, sigma=sigma, lam=lam),
                             label=f"ADREREG σ={sigma} λ={lam}"))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    parser.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--k", type=int, default=8, help="ADREREG's draws per example")
    parser.add_argument("--control-sigmas", type=float, nargs="*", default=[0.5, 1.0],
                        help="also train Basic with k draws (averaged loss) at these sigmas: "
                             "the same compute per step as ADREREG")
    parser.add_argument("--single-draw", action=argparse.BooleanOptionalAction, default=True,
                        help="ADREREG's l_per from one draw (the paper's Table-1 variant)")
    parser.add_argument("--lr", type=float, default=0.01,
                        help="the preset's 0.05 made ADREREG (lambda 0.3) diverge")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr-step", type=int, default=3, help="lr / 10 after this many epochs")
    args = parser.parse_args()
    if not set(args.control_sigmas) <= set(args.sigmas):
        parser.error(f"--control-sigmas must be among --sigmas {args.sigmas}, "
                     f"got {args.control_sigmas}")
    all_runs = runs(args)
    files = execute(STUDY, all_runs, args)
    sections = [("Certified accuracy (CERTIFY), Basic vs ADREREG", curves_of(files), None)]
    comparisons = []
    for sigma in args.sigmas:
        mine = [f for f, r in zip(files, all_runs, strict=True) if r.train["sigma"] == sigma]
        comparisons.append((mine[0], mine[1:]))  # the Basic run of this sigma comes first
        if sigma in args.control_sigmas:  # ADREREG against Basic at the same compute
            comparisons.append((mine[1], mine[2:]))
        sections.append((f"σ = {sigma}: Basic vs ADREREG (CERTIFY)", curves_of(mine),
                         f"table1_sigma{sigma}.png"))
        sections.append((f"σ = {sigma}: CERTIFY vs T-CERTIFY (paper, strict), same samples",
                         curves_of(mine, ("certify", "tcertify", "tcertify-strict")), None))
    basics = [f for f, r in zip(files, all_runs, strict=True) if r.name.startswith("basic_s")]
    sections.append(("Figure 2 in kind: Basic models, CERTIFY (dashed) vs T-CERTIFY (solid)",
                     curves_of(basics, ("certify", "tcertify")), "fig2.png"))
    data = (f"the first {args.train_subset} MNIST training images" if args.train_subset
            else "the full MNIST training set")
    l_per = "one draw (the paper's Table-1 variant)" if args.single_draw else "all k draws"
    notes = (f"LeNet on {data}; Basic: Gaussian augmentation with one draw per example "
             f"(Basic k = {args.k}: the loss averaged over k draws, as compute control); "
             f"ADREREG: k = {args.k} draws for the regulariser, l_per from {l_per}; "
             f"{args.epochs} epochs (SGD "
             f"momentum 0.9, lr {args.lr} divided by 10 after {args.lr_step} epochs, batch 128). "
             f"Certification: alpha = {args.alpha}, n0 = {args.n0}, n = {args.n} (the paper "
             f"used n = 100,000), every {args.skip}th MNIST test image from index 0, "
             f"{args.max} images. Seed {args.seed}. Autocast: {args.amp}.")
    write_summary(STUDY, "MNIST: Table 1 and Figure 2 in kind", sections, notes, files,
                  comparisons)


if __name__ == "__main__":
    main()
