"""Basic vs ADREREG on the real CIFAR-10 subset (7,897 train / 932 test images), ResNet-20.

The subset is not CIFAR-10: it shows the pipeline on colour images at CPU scale.

    python experiments/cifar_subset.py --data-dir ../shared/data/cifar10-subset/cifar10_subset.npz
"""

from __future__ import annotations

import argparse

from study import REPO, Run, add_common_arguments, curves_of, execute, write_summary

STUDY = "cifar_subset"
DEFAULT_SUBSET = REPO.parent / "shared" / "data" / "cifar10-subset" / "cifar10_subset.npz"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.set_defaults(skip=2, max=466, batch=500, n=2_000)
    parser.add_argument("--data-dir", default=str(DEFAULT_SUBSET))
    parser.add_argument("--sigma", type=float, default=0.25)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--model", default="cifar_resnet20")
    return parser


def runs(args: argparse.Namespace) -> list[Run]:
    common = dict(dataset="cifar10", model=args.model, data_dir=args.data_dir, k=args.k,
                  sigma=args.sigma, epochs=args.epochs, batch=128, lr=0.1, schedule="step",
                  lr_step=max(1, args.epochs * 2 // 3), eval_subset=466)
    return [
        Run("basic", dict(common, objective="gaussian"), label="Basic",
            certify={"data_dir": args.data_dir}),
        Run(f"adre_l{args.lam}", dict(common, objective="adre", lam=args.lam),
            label=f"ADREREG λ={args.lam}", certify={"data_dir": args.data_dir}),
    ]


def main() -> None:
    args = parser().parse_args()
    files = execute(STUDY, runs(args), args)
    notes = (f"A SUBSET of CIFAR-10 (7,897 training and 932 test images, see "
             f"shared/data/README.md), {args.model}, sigma = {args.sigma}, k = {args.k}, "
             f"{args.epochs} epochs, batch 128, lr 0.1 / 10 after 2/3 of the epochs, random crop "
             f"+ flip. Certification: alpha = {args.alpha}, n0 = {args.n0}, n = {args.n}, every "
             f"{args.skip}th subset test image, {args.max} images.")
    sections = [
        ("Basic vs ADREREG (CERTIFY)", curves_of(files), "cifar_subset.png"),
        ("CERTIFY vs T-CERTIFY", curves_of(files, ("certify", "tcertify", "tcertify-strict")),
         None),
    ]
    write_summary(STUDY, "CIFAR-10 subset: Basic vs ADREREG", sections, notes, files,
                  [(files[0], files[1:])], gain_radii=(0.0, 0.25, 0.5))


if __name__ == "__main__":
    main()
