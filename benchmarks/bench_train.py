"""Training cost per step and per epoch for each method (issue item 4).

One optimisation step as `Trainer.train_epoch` runs it: draw sigma * N(0, I) noise of shape
[B, k, *x], the method's loss (`smoothcert.objectives`), zero_grad, backward, SGD step. The
methods of a group are measured in interleaved repetitions on the same random batch (the cost
does not depend on the pixel values). Seconds per MNIST epoch = median step time x the number
of steps of one epoch (60 000 // batch; data loading from memory is not included).

ADREREG's regulariser is the difference between `adre` and `gaussian` with the same k: target
<= 5 %. (The `gaussian` objective already evaluates l_adre for its log, so the regulariser's
extra cost is its backward pass.)
"""

from __future__ import annotations

import sys
from functools import partial

import torch
from _common import (
    Table,
    emit,
    interleaved,
    machine_info,
    median,
    paired_ratio,
    parse_args,
    setup,
)
from _loops import LABELS, SHAPES, make_model

from smoothcert.objectives import ObjectiveConfig, adre_loss, get_objective

SIGMA, LAM, EPS = 0.25, 2.0, 0.5
MNIST_TRAIN = 60_000
FULL = {
    "models": [("lenet", "mnist", 128), ("cifar_resnet110", "cifar10", 32)],
    "ks": [1, 4, 8],
    "reps": {"lenet": 11, "cifar_resnet110": 7},
    "steps_per_rep": {"lenet": 4, "cifar_resnet110": 1},
}
QUICK = {
    "models": [("lenet", "mnist", 32), ("cifar_resnet20", "cifar10", 8)],
    "ks": [1, 4],
    "reps": {"lenet": 2, "cifar_resnet20": 2},
    "steps_per_rep": {"lenet": 1, "cifar_resnet20": 1},
}
LABELS = {**LABELS, "cifar_resnet20": "ResNet-20 (CIFAR)"}


def make_step(model, method: str, cfg: ObjectiveConfig, batch: int, dataset: str,
              channels_last: bool = False, amp: str | None = None):
    """A closure running one training step of `method` (as Trainer.train_epoch does)."""
    objective = get_objective(method)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((batch, *SHAPES[dataset]), generator=generator)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(10, (batch,), generator=generator)

    def step():
        noise = torch.randn((batch, cfg.k, *x.shape[1:]), generator=generator).mul_(SIGMA)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp == "bf16"):
            loss, _ = objective(model, x, y, noise, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def loss_backward(logits, y, lam: float) -> None:
    logits.grad = None
    loss, _ = adre_loss(logits, y, lam)
    loss.backward()


def regulariser_cost(batch: int, k: int, reps: int, classes: int = 10, inner: int = 20) -> float:
    """Seconds per step that lam > 0 adds to adre_loss's forward and backward on fixed logits
    (the whole difference between the adre and gaussian objectives)."""
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn((batch, k, classes), generator=generator, requires_grad=True)
    y = torch.randint(classes, (batch,), generator=generator)
    runs = {lam: partial(repeat, partial(loss_backward, logits, y, lam), inner)
            for lam in (0.0, LAM)}
    for run in runs.values():
        run()
    times = interleaved(runs, 3 * reps)
    return max(0.0, (median(times[LAM]) - median(times[0.0])) / inner)


def repeat(step, times: int) -> None:
    for _ in range(times):
        step()


def main(argv=None) -> list[Table]:
    args = parse_args(__doc__.splitlines()[0], argv)
    plan = QUICK if args.quick else FULL
    settings = setup(args.threads)
    table = Table(
        "train",
        "4. Training cost per step (and per MNIST epoch)",
        ["model", "batch", "method", "k", "PGD steps", "s / step", "s / epoch",
         "vs gaussian (same k)"],
    )
    overhead = Table("train-regulariser", "4b. ADREREG regulariser overhead over Gaussian "
                     "augmentation with the same k (target <= 5 %)",
                     ["model", "k", "gaussian s/step", "adre s/step", "overhead (end to end)",
                      "regulariser alone (ms)", "regulariser alone / gaussian step"])
    for name, dataset, batch in plan["models"]:
        per_rep = plan["steps_per_rep"][name]
        reps = plan["reps"][name]
        epoch_steps = MNIST_TRAIN // batch if dataset == "mnist" else None
        model = make_model(name, dataset).train()

        def timed(step, per_rep=per_rep):
            return partial(repeat, step, per_rep)

        def record(method, k, steps, seconds, ratio="", batch=batch, name=name,
                   epoch_steps=epoch_steps):
            epoch = seconds * epoch_steps if epoch_steps else "-"
            table.add(LABELS[name], batch, method, k, steps, seconds, epoch, ratio)

        for k in plan["ks"]:
            cfgs = {"gaussian": ObjectiveConfig(k=k), "adre": ObjectiveConfig(k=k, lam=LAM)}
            runs = {m: timed(make_step(model, m, c, batch, dataset)) for m, c in cfgs.items()}
            for run in runs.values():
                run()  # warm-up
            times = interleaved(runs, reps)
            g, a = (median(times[m]) / per_rep for m in ("gaussian", "adre"))
            ratio = paired_ratio(times["adre"], times["gaussian"])
            record("gaussian", k, "-", g)
            record("adre", k, "-", a, f"{ratio:.3f}x")
            isolated = regulariser_cost(batch, k, reps)
            overhead.add(LABELS[name], k, g, a, f"{100 * (ratio - 1):+.1f} %",
                         isolated * 1e3, f"{100 * isolated / g:+.2f} %")
        runs = {}
        for steps in (1, 2):
            cfg = ObjectiveConfig(k=1, lam=LAM, eps=EPS, steps=steps)
            runs[f"adreadv-{steps}"] = timed(make_step(model, "adreadv", cfg, batch, dataset))
        runs["gaussian"] = timed(make_step(model, "gaussian", ObjectiveConfig(k=1), batch, dataset))
        for run in runs.values():
            run()
        times = interleaved(runs, reps)
        for steps in (1, 2):
            key = f"adreadv-{steps}"
            ratio = paired_ratio(times[key], times["gaussian"])
            record("adreadv", 1, steps, median(times[key]) / per_rep, f"{ratio:.2f}x")
        # The fast path for training: channels_last model and input, then bf16 autocast.
        runs = {"fp32": timed(make_step(model, "gaussian", ObjectiveConfig(k=1), batch, dataset))}
        cl_model = make_model(name, dataset, channels_last=True).train()
        runs["cl"] = timed(make_step(cl_model, "gaussian", ObjectiveConfig(k=1), batch, dataset,
                                     channels_last=True))
        runs["cl+bf16"] = timed(make_step(cl_model, "gaussian", ObjectiveConfig(k=1), batch,
                                          dataset, channels_last=True, amp="bf16"))
        for run in runs.values():
            run()
        times = interleaved(runs, reps)
        for key in ("cl", "cl+bf16"):
            ratio = paired_ratio(times["fp32"], times[key])
            record(f"gaussian {key}", 1, "-", median(times[key]) / per_rep,
                   f"{ratio:.2f}x faster")
    table.notes.append(
        f"sigma {SIGMA}, lam {LAM}, adreadv eps {EPS} with k = 1; SGD with momentum; fp32 "
        "contiguous unless marked; medians of interleaved repetitions ("
        + ", ".join(f"{LABELS[m]}: {r} x {plan['steps_per_rep'][m]} steps"
                    for m, r in plan["reps"].items())
        + "); 'vs gaussian' is the median per-repetition time ratio to gaussian with the same "
        "k ('x faster': speed-up over fp32 gaussian)."
    )
    overhead.notes.append(
        "end to end: median per-repetition ratio adre / gaussian - 1 (noise of a few % between "
        "repetitions); alone: the extra time of adre_loss's forward + backward with lam > 0 "
        "over lam = 0 on fixed logits [B, k, 10], which is the whole difference between the "
        "two objectives (gaussian already computes l_adre for its log)."
    )
    emit([table, overhead], args.json, {**machine_info(), **settings})
    return [table, overhead]


if __name__ == "__main__":
    main(sys.argv[1:])
