"""Denoised smoothing on MNIST/LeNet: a clean LeNet alone, behind DnCNNs, beside a Gaussian LeNet.

At each sigma: a *clean* LeNet (the gaussian objective at sigma 0.001, far below a pixel step
1/255: training without noise in effect) certified alone at sigma; the same LeNet behind a
dncnn_small trained with denoiser-mse, and behind one trained with denoiser-stability for it
(from scratch; `train --init` would fine-tune the MSE one, not measured here); beside the
Gaussian-trained LeNet of the Table-1 study (Basic, trained here with its recipe). Every result
file holds CERTIFY and T-CERTIFY from the same samples; the summary has the paired differences
+- SE and the cost of each run.

    python experiments/mnist_denoised.py            # the study of docs/reproduction.md (resumable)

Its n defaults to 1,000 (the radii stop at 2.46 sigma), not the other studies' 10,000: behind a
DnCNN each sample costs a denoiser pass, and this size fits an afternoon on two CPU cores.
"""

from __future__ import annotations

import argparse

from study import Run, add_common_arguments, curves_of, execute, run_dir, write_summary

from smoothcert.train import CHECKPOINT

STUDY = "mnist_denoised"
CLEAN_SIGMA = 0.001  # the noise of the "clean" LeNet's training: none, in effect


def checkpoint_of(name: str, args: argparse.Namespace) -> str:
    return str(run_dir(STUDY, name, args.root) / CHECKPOINT)


def runs(args: argparse.Namespace) -> tuple[list[Run], list[Run]]:
    """(runs that need no other run's checkpoint, the stability runs that need the clean one)."""
    common = dict(preset="mnist-lenet", lr=args.lr, epochs=args.epochs, lr_step=args.lr_step)
    denoiser = dict(common, model="dncnn_small", epochs=args.denoiser_epochs)
    first, second = [], []
    for sigma in args.sigmas:
        clean = checkpoint_of(f"clean_s{sigma}", args)

        def behind(name: str, sigma: float = sigma, clean: str = clean) -> dict:
            return dict(checkpoint=clean, sigma=sigma, denoiser=checkpoint_of(name, args))

        first += [
            Run(f"clean_s{sigma}", dict(common, objective="gaussian", k=1, sigma=CLEAN_SIGMA),
                label=f"clean LeNet σ={sigma}", certify=dict(sigma=sigma)),
            Run(f"mse_s{sigma}", dict(denoiser, objective="denoiser-mse", sigma=sigma,
                                      lr=args.mse_lr),
                label=f"DnCNN (MSE) + clean LeNet σ={sigma}", certify=behind(f"mse_s{sigma}")),
            Run(f"basic_s{sigma}", dict(common, objective="gaussian", k=1, sigma=sigma),
                label=f"Basic σ={sigma}"),
        ]
        second.append(
            Run(f"stability_s{sigma}", dict(denoiser, objective="denoiser-stability",
                                            sigma=sigma, lr=args.stability_lr, classifier=clean),
                label=f"DnCNN (stability) + clean LeNet σ={sigma}",
                certify=behind(f"stability_s{sigma}")))
    return first, second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.25, 0.5])
    parser.add_argument("--lr", type=float, default=0.01, help="the LeNets' learning rate")
    parser.add_argument("--epochs", type=int, default=4, help="the LeNets' epochs")
    parser.add_argument("--lr-step", type=int, default=3, help="lr / 10 after this many epochs")
    parser.add_argument("--denoiser-epochs", type=int, default=2)
    parser.add_argument("--mse-lr", type=float, default=0.01)
    parser.add_argument("--stability-lr", type=float, default=0.001)
    parser.set_defaults(n=1_000)
    args = parser.parse_args()
    first, second = runs(args)
    # The stability objective reads the clean LeNet's checkpoint: checked once it is trained.
    files = execute(STUDY, first, args) + execute(STUDY, second, args)
    order = {run_.name: tsv for run_, tsv in zip(first + second, files, strict=True)}
    sections, comparisons = [], []
    for sigma in args.sigmas:
        clean, mse, stability, basic = (order[f"{kind}_s{sigma}"] for kind in
                                        ("clean", "mse", "stability", "basic"))
        sections.append((f"σ = {sigma} (CERTIFY)", curves_of([clean, mse, stability, basic]),
                         f"denoised_sigma{sigma}.png"))
        comparisons += [(clean, [mse, stability, basic]), (basic, [mse, stability]),
                        (mse, [stability])]
    notes = (
        f"LeNet on MNIST ({args.epochs} epochs, lr {args.lr} / 10 after {args.lr_step}, "
        f"seed {args.seed}, autocast {args.amp}); clean: gaussian at σ = {CLEAN_SIGMA}. "
        f"dncnn_small denoisers: {args.denoiser_epochs} epochs, denoiser-mse at lr "
        f"{args.mse_lr}, denoiser-stability (for the clean LeNet) at lr {args.stability_lr}. "
        f"Certification: alpha = {args.alpha}, n0 = {args.n0}, n = {args.n}, every "
        f"{args.skip}th test image from index 0, {args.max} images."
    )
    write_summary(STUDY, "MNIST: denoised smoothing of a clean LeNet", sections, notes,
                  files, comparisons)


if __name__ == "__main__":
    main()
