"""The field's baselines on MNIST/LeNet: MACER, Consistency and SmoothMix beside Basic and ADREREG.

Same protocol as the Table-1 study (mnist_table1.py): LeNet, the full MNIST training set, 4
epochs, lr 0.01 / 10 after 3, batch 128, seed 0, bf16; CERTIFY with alpha 0.001, n0 100,
n 10,000 on every 20th test image. Basic and ADREREG (lambda 0.2, k = 8, single-draw l_per)
are not trained again when results/mnist_table1 (--reuse-from) holds them with the same
settings: their rows at this study's test points are copied here (otherwise they are trained).
New: MACER, Consistency, Consistency + ADRE's regulariser (does ADRE add to Consistency?) and
SmoothMix, each with its paper's MNIST hyper-parameters, at every sigma.

    python experiments/mnist_baselines.py                      # the full study (resumable)
    python experiments/mnist_baselines.py --skip 40 --max 250   # every 40th test image only

Copied rows need test points the Table-1 study certified (every 20th image): --skip 20k.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from pathlib import Path

from study import (
    REPO,
    Run,
    add_common_arguments,
    amp_of,
    certify_config,
    curves_of,
    execute,
    result_dir,
    write_summary,
)

from smoothcert.io import atomic_write_json, atomic_write_text
from smoothcert.presets import resolve_config, upgrade_config
from smoothcert.runner import selected_indices
from smoothcert.train import RESUMABLE_CHANGES

STUDY = "mnist_baselines"  # with --train-subset N: mnist_baselines_trainN
MNIST_TEST = 10_000
# The MNIST settings the papers' authors used (MACER's lambda by sigma; SmoothMix's attack
# steps T by sigma, step alpha = 1.0, m = 4; Consistency's lambda 5 at sigma 0.5 and 1.0).
MACER_LAM = {0.25: 16.0, 0.5: 16.0, 1.0: 6.0}
SMOOTHMIX_STEPS = {0.25: 3, 0.5: 4, 1.0: 8}
CONSISTENCY_LAM = {0.25: 10.0, 0.5: 5.0, 1.0: 5.0}
# Certification settings a reused result file must share (besides holding the test points).
SAME_CERTIFICATION = ("n0", "n", "alpha", "seed", "amp", "grid", "split", "dataset", "sigma")


def runs(args: argparse.Namespace) -> list[Run]:
    common = dict(preset="mnist-lenet", lr=args.lr, epochs=args.epochs, lr_step=args.lr_step)
    found = []
    defer = args.lr_step if args.macer_defer is None else args.macer_defer
    for sigma in args.sigmas:
        lam = args.adre_lam
        consistency = dict(common, objective="consistency", k=2, sigma=sigma,
                           consistency_lam=CONSISTENCY_LAM[sigma],
                           consistency_eta=args.consistency_eta)
        found += [
            Run(f"basic_s{sigma}", dict(common, objective="gaussian", k=1, sigma=sigma),
                label=f"Basic σ={sigma}"),
            Run(f"adre_s{sigma}_l{lam}", dict(common, objective="adre", k=8, single_draw=True,
                                                lam=lam, sigma=sigma),
                label=f"ADREREG σ={sigma} λ={lam}"),
            Run(macer_name(args, sigma), dict(common, objective="macer", k=16, sigma=sigma,
                                              macer_lam=MACER_LAM[sigma], macer_beta=16.0,
                                              macer_gamma=8.0, macer_defer=defer),
                label=f"MACER σ={sigma}" + ("" if defer == args.lr_step else
                                            f", robustness term from epoch {defer + 1}")),
            Run(f"consistency_s{sigma}", consistency, label=f"Consistency σ={sigma}"),
            Run(f"consistency_adre_s{sigma}_l{lam}", dict(consistency, lam=lam),
                label=f"Consistency + ADRE σ={sigma} λ={lam}"),
            Run(f"smoothmix_s{sigma}", dict(common, objective="smoothmix", k=4, sigma=sigma,
                                            steps=SMOOTHMIX_STEPS[sigma], smoothmix_step=1.0,
                                            smoothmix_eta=args.smoothmix_eta,
                                            eps_warmup=args.smoothmix_warmup),
                label=f"SmoothMix σ={sigma}"),
        ]
    return found


def study_name(args: argparse.Namespace) -> str:
    """The results folder: a run on part of the training set is another study."""
    return f"{STUDY}_train{args.train_subset}" if args.train_subset else STUDY


def macer_name(args: argparse.Namespace, sigma: float) -> str:
    """macer_s<sigma> with the robustness term deferred to the lr decay, else macer_d<D>_s..."""
    if args.macer_defer is None or args.macer_defer == args.lr_step:
        return f"macer_s{sigma}"
    return f"macer_d{args.macer_defer}_s{sigma}"


def reuse(run_: Run, args: argparse.Namespace) -> str | None:
    """Copy `run_`'s rows at this study's test points from --reuse-from if it was trained and
    certified there with the same settings; return why not otherwise (None: copied)."""
    source = args.reuse_from / f"{run_.name}.tsv"
    target = result_dir(study_name(args), args.root) / source.name
    meta_path, train_path = Path(f"{source}.json"), source.with_name(f"{run_.name}.train.json")
    if not (source.exists() and meta_path.exists() and train_path.exists()):
        return f"{source} not found"
    trained = json.loads(train_path.read_text())
    ours = asdict(resolve_config(seed=args.seed, train_subset=args.train_subset,
                                 amp=amp_of(args), channels_last=True, **run_.train))
    differ = sorted(key for key, value in upgrade_config(trained["config"]).items()
                    if key in ours and key not in RESUMABLE_CHANGES and ours[key] != value)
    meta = json.loads(meta_path.read_text())
    certify = certify_config(run_, args, "", target)
    wanted = {key: getattr(certify, key, None) for key in SAME_CERTIFICATION}
    wanted.update(dataset="mnist", sigma=run_.train["sigma"], split="test")
    differ += sorted(key for key, value in wanted.items() if meta.get(key) != value)
    differ = sorted(set(differ))
    if differ:
        return f"{source} differs in {', '.join(differ)}"
    lines = source.read_text().splitlines()
    rows = {int(line.split("\t", 1)[0]): line for line in lines[1:] if line.strip()}
    indices = selected_indices(MNIST_TEST, args.skip, args.max)
    if not set(indices) <= set(rows):
        return f"{source} lacks some of this study's test points"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, "\n".join([lines[0], *(rows[i] for i in indices)]) + "\n")
    meta.update(skip=args.skip,
                protocol=(f"test split, every {args.skip}th example from index 0, "
                          f"{len(indices)} examples"),
                copied_from=os.path.relpath(source.resolve(), REPO))
    atomic_write_json(Path(f"{target}.json"), meta)
    atomic_write_json(target.with_name(train_path.name), trained)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_arguments(parser)
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.5, 1.0],
                        choices=sorted(MACER_LAM))
    parser.add_argument("--adre-lam", type=float, default=0.2,
                        help="ADREREG's lambda, also ADRE's lambda on top of Consistency")
    parser.add_argument("--macer-defer", type=int, default=None,
                        help="epochs before MACER's robustness term is switched on (default: "
                             "--lr-step, i.e. from the lr decay on, as the MNIST recipe of "
                             "later papers; 0 made LeNet collapse here)")
    parser.add_argument("--consistency-eta", type=float, default=0.5)
    parser.add_argument("--smoothmix-eta", type=float, default=5.0)
    parser.add_argument("--smoothmix-warmup", type=int, default=1,
                        help="epochs over which SmoothMix's eta ramps up (1: none; the paper "
                             "ramps it over 10 of 90 epochs)")
    parser.add_argument("--reuse-from", type=Path, default=result_dir("mnist_table1", None),
                        help="copy Basic's and ADREREG's rows from the result files there when "
                             "they were trained and certified with this study's settings")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr-step", type=int, default=3, help="lr / 10 after this many epochs")
    args = parser.parse_args()
    all_runs = runs(args)
    study = study_name(args)
    for run_ in all_runs:
        done = (result_dir(study, args.root) / f"{run_.name}.tsv").exists()
        wanted = not args.only or run_.name in args.only
        if run_.name.startswith(("basic_", "adre_")) and wanted and not done:
            why = reuse(run_, args)
            print(f"[{study}] {run_.name}: " + (f"trained here ({why})" if why else
                                                 f"rows from {args.reuse_from}"))
    files = execute(study, all_runs, args)
    sections, comparisons = [], []
    for sigma in args.sigmas:
        mine = [f for f, r in zip(files, all_runs, strict=True) if r.train["sigma"] == sigma]
        basic, adre, macer, consistency, consistency_adre, smoothmix = mine
        sections.append((f"σ = {sigma} (CERTIFY)", curves_of(mine), f"baselines_sigma{sigma}.png"))
        comparisons += [(basic, mine[1:]), (adre, [macer, consistency, consistency_adre,
                                                   smoothmix]),
                        (consistency, [consistency_adre])]
    reused = [f.stem for f in files if Path(f"{f}.json").exists()
              and "copied_from" in json.loads(Path(f"{f}.json").read_text())]
    data = (f"the first {args.train_subset} MNIST training images" if args.train_subset
            else "the full MNIST training set")
    defer = args.lr_step if args.macer_defer is None else args.macer_defer
    notes = (
        f"LeNet on {data}, {args.epochs} epochs (SGD momentum 0.9, lr {args.lr} / 10 after "
        f"{args.lr_step} epochs, batch 128), seed {args.seed}, autocast {args.amp}. Basic: "
        f"Gaussian augmentation, one draw. ADREREG: lambda {args.adre_lam}, k = 8, l_per from "
        f"one draw. MACER: k = 16, beta 16, gamma 8, lambda {MACER_LAM} by sigma, the "
        f"robustness term from epoch {defer + 1} on. Consistency: "
        f"m = 2, eta {args.consistency_eta}, lambda {CONSISTENCY_LAM} by sigma; + ADRE: "
        f"ADRE's regulariser with lambda {args.adre_lam} added. SmoothMix: m = 4, alpha 1.0, "
        f"T {SMOOTHMIX_STEPS} by sigma, eta {args.smoothmix_eta} (warm-up over "
        f"{args.smoothmix_warmup} epoch(s)), mixing weight ~ U[0, 1/2]. Certification: "
        f"alpha = {args.alpha}, n0 = {args.n0}, n = {args.n}, every {args.skip}th MNIST test "
        f"image from index 0, {args.max} images. Rows copied from earlier runs with the same "
        f"settings at the same test points: {', '.join(reused) or 'none'}."
    )
    write_summary(study, "MNIST: MACER, Consistency and SmoothMix beside Basic and ADREREG",
                  sections, notes, files, comparisons, gain_radii=(0.0, 0.5, 1.0, 1.5, 2.0, 2.5))


if __name__ == "__main__":
    main()
