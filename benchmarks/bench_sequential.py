"""Sequential and input-specific certification against fixed n (issue 16).

Models: the MNIST LeNets of the reproduction and the CIFAR-10 subset's ResNet-20.

Per test point, one noise stream serves every procedure (a paired design): n0 selection
samples pick the label, then the estimation samples are drawn in chunks whose ends are every
look of every sequential procedure, the adaptive n and max_n. Each procedure sees exactly the
samples it would have drawn alone, in the same order:

- fixed:      CERTIFY, T-CERTIFY (and strict) on all max_n samples (Smooth.certify_all);
- seq-*:      sequential.RadiiProcedure (what Smooth.certify_radii drives) at the Table-1
              radii below the max_n ceiling, stopped when every radius is decided
              (and, for comparison, at the one radius 0.5);
- adaptive:   CERTIFY / T-CERTIFY on the first choose_n(selection) samples
              (what Smooth.certify_adaptive computes).

Passes count selection + estimation samples. A procedure's time is the selection time, the
sampling time of the chunks it used and its own statistics time. Certified accuracy at r:
label correct and certified at r (fixed: radius >= r); paired SE of the per-point difference,
and the binomial SE of fixed n's certified accuracy, sqrt(a (1 - a) / points), against which
issue 26 asks every difference to stay within 1 SE. "seq-certify (mixture)" runs the defaults
(final look and futility rule); "no futility" the procedure before the rule; "no final look"
the procedure of issue 16.

    python benchmarks/bench_sequential.py --points 500      # the issue's full size
    python benchmarks/bench_sequential.py --quick           # smoke run
    python benchmarks/bench_sequential.py --compare-only    # model-free CS comparison only
    python benchmarks/bench_sequential.py --merge a.json b.json --json all.json  # runs split
                                                            # by --models, one set of tables

Checkpoints: runs/experiments/mnist_table1/<name>/ and runs/experiments/cifar_subset/basic/
(not committed); missing ones are trained first with the reproduction's settings
(docs/reproduction.md: Study 1; experiments/cifar_subset.py for the CIFAR-10 subset, read
from ../shared/data).
"""

from __future__ import annotations

import json
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from _common import ROOT, Table, emit, machine_info, parse_args, setup
from scipy.special import ndtri

from smoothcert.data import get_dataset
from smoothcert.rng import generator as stream
from smoothcert.sequential import RadiiProcedure, choose_n
from smoothcert.smooth import CertifyAllResult, Smooth
from smoothcert.train import load_model

MODELS = {"basic_s0.25": "Basic σ=0.25", "basic_s0.5": "Basic σ=0.5",
          "basic_s1.0": "Basic σ=1.0", "adre_s1.0_l0.2": "ADREREG σ=1.0 λ=0.2",
          "cifar_basic_s0.25": "CIFAR-10 subset ResNet-20 Basic σ=0.25"}
DEFAULT_SKIP = {"mnist": 20, "cifar10": 2}  # as the reproduction's studies certify
TABLE1 = np.arange(13) * 0.25
ONE_RADIUS = 0.5
# name -> RadiiProcedure options; "only": the procedure asks about that one radius
SEQUENTIAL = {
    "seq-certify (mixture)": dict(method="certify", confidence_sequence="mixture"),
    "seq-certify (mixture, no futility)": dict(method="certify", confidence_sequence="mixture",
                                               futility=None),
    "seq-certify (mixture, no final look)": dict(method="certify", confidence_sequence="mixture",
                                                 final_share=0.0, futility=None),
    "seq-certify (mixture, precision 0.25)": dict(method="certify",
                                                  confidence_sequence="mixture", precision=0.25),
    "seq-certify (bonferroni)": dict(method="certify", confidence_sequence="bonferroni"),
    "seq-tcertify (mixture)": dict(method="tcertify", confidence_sequence="mixture"),
    f"seq-certify (mixture, r = {ONE_RADIUS} only)": dict(
        method="certify", confidence_sequence="mixture", only=ONE_RADIUS),
}


def extra_arguments(parser) -> None:
    parser.add_argument("--points", type=int, default=100, help="test points per model")
    parser.add_argument("--skip", type=int, default=None,
                        help="every skip-th test image (default: 20 for MNIST, 2 for the "
                             "CIFAR-10 subset)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--procedures", nargs="+", choices=list(SEQUENTIAL),
                        default=list(SEQUENTIAL), help="the sequential procedures to run")
    parser.add_argument("--checkpoint", type=Path,
                        help="certify this checkpoint (one of --models, not trained further) "
                             "instead of the study's")
    parser.add_argument("--max-n", type=int, default=100_000)
    parser.add_argument("--n0", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=0.001)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--tolerances", type=float, nargs="+", default=[0.02, 0.05],
                        help="--adaptive-n radius-loss bounds to evaluate")
    parser.add_argument("--amp", default="bf16", choices=["bf16", "none"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--paths", type=int, default=60,
                        help="simulated count paths per pA in the model-free comparison "
                             "(0: skip it)")
    parser.add_argument("--compare-only", action="store_true",
                        help="only the model-free comparison of the confidence sequences")
    parser.add_argument("--merge", nargs="+", type=Path, metavar="JSON",
                        help="run nothing: print (and with --json write) the tables of these "
                             "runs' --json files, rows of the same table concatenated")


def checkpoint(name: str) -> Path:
    """The study's checkpoint of `name`, trained first if missing (as mnist_table1.py or
    cifar_subset.py would)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import cifar_subset
    import mnist_table1
    from study import run_dir

    from smoothcert.presets import resolve_config
    from smoothcert.train import train

    if name == "cifar_basic_s0.25":  # cifar_subset.py's defaults: sigma 0.25, ResNet-20
        study, run_name = cifar_subset.STUDY, "basic"
        found = cifar_subset.runs(cifar_subset.parser().parse_args([]))
    else:
        study, run_name = mnist_table1.STUDY, name
        found = mnist_table1.runs(Namespace(
            lr=0.01, epochs=4, lr_step=3, k=8, single_draw=True, sigmas=[0.25, 0.5, 1.0],
            control_sigmas=[], lams=[0.1, 0.2, 0.3]))
    out = run_dir(study, run_name, None)
    print(f"{name}: {out} (training whatever epochs are missing)", flush=True)
    cfg = resolve_config(seed=0, out=str(out), train_subset=0, amp="bf16", channels_last=True,
                         **next(r for r in found if r.name == run_name).train)
    return train(cfg, resume=True, progress=False)


def ceiling_radii(sigma: float, max_n: int, alpha: float) -> np.ndarray:
    """The Table-1 radii that n = max_n can certify at all (below sigma Phi^-1(alpha^(1/n)))."""
    return TABLE1[TABLE1 <= sigma * ndtri(alpha ** (1.0 / max_n))]


def procedure_radii(radii: np.ndarray, options: dict) -> np.ndarray:
    return np.array([options["only"]]) if "only" in options else radii


def procedure_options(options: dict) -> dict:
    return {key: value for key, value in options.items() if key != "only"}


class Clock:
    """Sampling time per chunk, so each procedure can be charged for the chunks it used."""

    def __init__(self):
        self.ends, self.seconds = [0], [0.0]

    def add(self, end: int, seconds: float) -> None:
        self.ends.append(end)
        self.seconds.append(self.seconds[-1] + seconds)

    def until(self, n: int) -> float:
        return self.seconds[self.ends.index(n)]


def certify_point(smooth: Smooth, x: torch.Tensor, generator: torch.Generator, radii,
                  args) -> dict:
    started = time.perf_counter()
    selection = smooth.sampler.counts(x, args.n0, args.batch, generator, name="n0")
    selection_time = time.perf_counter() - started
    label = int(np.argmax(selection))
    procedures = {name: RadiiProcedure(procedure_radii(radii, options), smooth.sigma,
                                       args.alpha, args.max_n, num_classes=smooth.num_classes,
                                       batch_size=args.batch, **procedure_options(options))
                  for name, options in SEQUENTIAL.items() if name in args.procedures}
    started = time.perf_counter()
    n_adaptive = {tol: choose_n(selection, args.max_n, smooth.sigma, args.alpha, tol)
                  for tol in args.tolerances}
    choose_time = (time.perf_counter() - started) / len(args.tolerances)
    ends = {*n_adaptive.values(), args.max_n}
    for procedure in procedures.values():
        ends |= set(procedure.cs.looks.tolist())
    clock, counts, own = Clock(), np.zeros(smooth.num_classes, dtype=np.int64), {}
    out = {"label": label, "seq": {}, "adaptive": {}}
    for end in sorted(ends):
        started = time.perf_counter()
        counts += smooth.sampler.counts(x, end - clock.ends[-1], args.batch, generator)
        clock.add(end, time.perf_counter() - started)
        for name, procedure in procedures.items():
            if not procedure.done and procedure.n + procedure.next_batch() == end:
                started = time.perf_counter()
                procedure.update(counts[label], end, np.delete(counts, label))
                own[name] = own.get(name, 0.0) + time.perf_counter() - started
        for tol in (tol for tol, n in n_adaptive.items() if n == end):
            started = time.perf_counter()
            adaptive = CertifyAllResult.from_counts(selection, counts.copy(), smooth.sigma,
                                                    args.alpha, 10)
            adaptive_time = selection_time + clock.until(end) + choose_time + (
                time.perf_counter() - started)
            out["adaptive"][tol] = dict(certify=adaptive.certify, tcertify=adaptive.tcertify,
                                        passes=args.n0 + end, seconds=adaptive_time)
    started = time.perf_counter()
    fixed = CertifyAllResult.from_counts(selection, counts, smooth.sigma, args.alpha, 10)
    out["fixed"] = dict(certify=fixed.certify, tcertify=fixed.tcertify,
                        passes=args.n0 + args.max_n,
                        seconds=selection_time + clock.until(args.max_n)
                        + time.perf_counter() - started)
    for name, procedure in procedures.items():
        out["seq"][name] = dict(
            certificate=procedure.certificate(label, args.n0),
            seconds=selection_time + clock.until(procedure.n) + own.get(name, 0.0),
            stats_seconds=own.get(name, 0.0),
        )
    return out


def paired(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Mean of b - a and its paired standard error."""
    d = b.astype(float) - a.astype(float)
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def worst_ratio(diffs: list[tuple[float, float]]) -> float:
    """max |d| / SE over (d, SE) pairs (a nonzero d with SE 0: infinite)."""
    return max(abs(d) / se if se else (0.0 if d == 0 else np.inf) for d, se in diffs)


def run_model(name: str, args, tables: dict[str, Table]) -> None:
    model, config = load_model(args.checkpoint or checkpoint(name))
    model = model.to(memory_format=torch.channels_last)
    sigma = float(config["sigma"])
    smooth = Smooth(model, 10, sigma, amp=None if args.amp == "none" else args.amp)
    dataset = config["dataset"]
    data = get_dataset(dataset, "test", data_dir=config.get("data_dir"), augment=False)
    skip = args.skip or DEFAULT_SKIP[dataset]
    indices = list(range(0, len(data), skip))[: args.points]
    radii = ceiling_radii(sigma, args.max_n, args.alpha)
    rows = []
    for count, idx in enumerate(indices, 1):
        x, y = data[idx]
        generator = stream(args.seed, "estimation", idx)
        rows.append((int(y), certify_point(smooth, x, generator, radii, args)))
        if count % 10 == 0 or count == len(indices):
            print(f"  {name}: {count}/{len(indices)}", flush=True)
    title = f"{MODELS[name]} ({len(rows)} points: test images 0, {skip}, {2 * skip}, …)"
    summarise(title, radii, rows, tables)


def summarise(title: str, radii, rows, tables: dict[str, Table]) -> None:
    truth = np.array([y for y, _ in rows])
    fixed_ok = {m: np.array([[r["fixed"][m].label == y and r["fixed"][m].radius >= rad
                              for rad in radii] for y, r in rows]) for m in ("certify", "tcertify")}
    passes_fixed = np.array([r["fixed"]["passes"] for _, r in rows])
    time_fixed = sum(r["fixed"]["seconds"] for _, r in rows)
    for name, options in SEQUENTIAL.items():
        if name not in rows[0][1]["seq"]:
            continue
        baseline = "tcertify" if "tcertify" in name else "certify"
        certs = [r["seq"][name]["certificate"] for _, r in rows]
        columns = np.searchsorted(radii, procedure_radii(radii, options))
        ok = np.array([[c.label == y and c.certified[i] for i in range(len(columns))]
                       for c, y in zip(certs, truth, strict=True)])
        reference = fixed_ok[baseline][:, columns]
        diffs = [paired(reference[:, i], ok[:, i]) for i in range(len(columns))]
        accuracy_se = np.sqrt(reference.mean(axis=0) * (1 - reference.mean(axis=0))
                              / len(reference))
        tables["accuracy"].add(
            title, f"{name} vs fixed {baseline}",
            " ".join(f"{reference[:, i].mean():.2f}/{ok[:, i].mean():.2f}"
                     for i in range(len(columns))),
            " ".join(f"{100 * d:+.1f}±{100 * se:.1f}" for d, se in diffs),
            worst_ratio(diffs), worst_ratio(list(zip([d for d, _ in diffs], accuracy_se,
                                                     strict=True))))
        passes = np.array([c.samples_used for c in certs])
        seconds = sum(r["seq"][name]["seconds"] for _, r in rows)
        stats_seconds = sum(r["seq"][name]["stats_seconds"] for _, r in rows)
        tables["passes"].add(title, name, float(passes.mean()), float(np.median(passes)),
                             int(passes.max()), float(passes_fixed.mean() / passes.mean()),
                             time_fixed / seconds, f"{100 * stats_seconds / seconds:.1f} %")
        kinds = {"abstain (nothing certified)": [not any(c.certified) for c in certs],
                 "every radius certified": [all(c.certified) for c in certs]}
        kinds["some certified, some dropped"] = [not (a or b) for a, b in zip(*kinds.values(),
                                                                              strict=True)]
        saved = passes_fixed - passes
        for kind, mask in kinds.items():
            mask = np.array(mask)
            if mask.any():
                share = saved[mask].sum() / max(saved.sum(), 1)
                tables["gain"].add(title, name, kind, int(mask.sum()),
                                   float(passes[mask].mean()),
                                   f"{100 * passes[mask].sum() / passes.sum():.0f} %",
                                   f"{100 * share:.0f} %")
    for tol in sorted(rows[0][1]["adaptive"]):
        adaptive = [r["adaptive"][tol] for _, r in rows]
        adaptive_passes = np.array([a["passes"] for a in adaptive])
        adaptive_time = sum(a["seconds"] for a in adaptive)
        for method in ("certify", "tcertify"):
            fixed = np.array([r["fixed"][method].radius * (r["fixed"][method].label == y)
                              for y, r in rows])
            mine = np.array([a[method].radius * (a[method].label == y)
                             for a, y in zip(adaptive, truth, strict=True)])
            d, se = paired(fixed, mine)
            tables["adaptive"].add(title, tol, method, fixed.mean(), mine.mean(),
                                   f"{d:+.4f} ± {se:.4f}", float(adaptive_passes.mean()),
                                   float(passes_fixed.mean() / adaptive_passes.mean()),
                                   time_fixed / adaptive_time)


def simulated_passes(options: dict, pa: float, radii, sigma: float, args, rng) -> np.ndarray:
    """Estimation samples the procedure uses on count paths ~ Bin(n, pa) (no model)."""
    used = []
    for _ in range(args.paths):
        procedure = RadiiProcedure(radii, sigma, args.alpha, args.max_n, batch_size=args.batch,
                                   **options)
        count = 0
        while (size := procedure.next_batch()) > 0:
            count += rng.binomial(size, pa)
            procedure.update(count, procedure.n + size)
        used.append(procedure.n)
    return np.array(used)


def compare_sequences(args) -> Table:
    sigma = 0.5
    radii = ceiling_radii(sigma, args.max_n, args.alpha)
    variants = {
        "bonferroni (first look 100)": dict(confidence_sequence="bonferroni"),
        "bonferroni (first look 1000)": dict(confidence_sequence="bonferroni", first_look=1000),
        "mixture (uniform+log-uniform+point mass)": dict(confidence_sequence="mixture"),
    }
    table = Table("compare", "Model-free: mean estimation samples to decide every Table-1 "
                  f"radius (σ = {sigma}, CERTIFY, α = {args.alpha}, max_n = {args.max_n:,}), "
                  "count paths ~ Bin(n, pA)", ["pA", "true radius", *variants])
    table.notes.append(f"radii {radii.tolist()}; {args.paths} simulated paths per pA, "
                       "the same seed for every variant")
    for pa in (0.3, 0.5, 0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9995, 0.9999, 1.0):
        means = [float(simulated_passes(options, pa, radii, sigma, args,
                                        np.random.default_rng(7)).mean())
                 for options in variants.values()]
        radius = sigma * ndtri(pa) if pa > 0.5 else 0.0
        table.add(f"{pa:g}", f"{radius:.3f}", *means)
    return table


def merge(paths: list[Path], out: Path | None) -> list[Table]:
    """One table per key, rows in the order of the files (e.g. runs split by model)."""
    payloads = [json.loads(path.read_text()) for path in paths]
    tables: dict[str, Table] = {}
    for payload in payloads:
        for data in payload["tables"]:
            if data["key"] in tables:
                tables[data["key"]].rows += data["rows"]
            else:
                tables[data["key"]] = Table.from_dict(data)
    emit(list(tables.values()), out, {"merged": [str(p) for p in paths],
                                      "runs": [p["meta"] for p in payloads]})
    return list(tables.values())


def main(argv=None) -> list[Table]:
    args = parse_args(__doc__.splitlines()[0], argv, extra_arguments)
    if args.quick:
        args.points, args.max_n, args.paths, args.models = 3, 10_000, 5, ["basic_s0.5"]
    if args.merge:
        return merge(args.merge, args.json)
    settings = setup(args.threads)
    tables = [compare_sequences(args)] if args.paths > 0 else []
    if not args.compare_only:
        by_key = {
            "accuracy": Table("accuracy", "Certified accuracy at the Table-1 radii below the "
                              "max_n ceiling: fixed/sequential, difference (points) ± paired SE",
                              ["model", "procedure", "accuracy per radius", "difference",
                               "max |d|/paired SE", "max |d|/SE(accuracy)"]),
            "passes": Table("passes", "Forward passes per input (selection included) and time",
                            ["model", "procedure", "mean", "median", "max",
                             "passes ratio (fixed/seq)", "wall-time ratio", "statistics"]),
            "gain": Table("gain", "Where the passes are saved", [
                "model", "procedure", "inputs", "count", "mean passes", "share of seq passes",
                "share of the saving"]),
            "adaptive": Table("adaptive", "--adaptive-n against fixed n: ACR, passes and time",
                              ["model", "tolerance", "method", "ACR fixed", "ACR adaptive",
                               "difference ± paired SE", "mean passes", "passes ratio",
                               "wall-time ratio"]),
        }
        for name in args.models:
            run_model(name, args, by_key)
        for table in by_key.values():
            table.notes.append(
                f"up to {args.points} points per model (from test image 0), "
                f"n0 = {args.n0}, max_n = {args.max_n:,}, alpha = {args.alpha}, batch "
                f"{args.batch}, autocast {args.amp}, seed {args.seed}")
        tables += list(by_key.values())
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    emit(tables, args.json, {**machine_info(), **settings, "args": arguments})
    return tables


if __name__ == "__main__":
    main(sys.argv[1:])
