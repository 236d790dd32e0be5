"""The progress bar of a training epoch: the epoch, the step, and the running loss and accuracy."""

from __future__ import annotations

import math
from time import monotonic

import torch
from tqdm.auto import tqdm

# A slow step refreshes the bar when it ends; a fast loop formats the running means (and waits
# for the device to compute them) once per interval, not every step.
REFRESH_SECONDS = 1.0
# The running means the bar shows, of the objective's terms that are there (a denoiser's
# MSE objective has no accuracy).
SHOWN = ("loss", "acc")


class EpochBar:
    """One epoch's bar, shown if `enabled`: call step(sums) after each of its `steps` steps
    with the sums of that epoch's loss and terms so far (this process's batches under torchrun,
    where only rank 0 shows a bar); use it as a context manager."""

    def __init__(self, steps: int, epoch: int, epochs: int, enabled: bool):
        # The bar refreshes whenever this class updates it: the timing is this class's own.
        self.bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                        disable=not enabled, leave=False, mininterval=0, miniters=1)
        self.steps_done = 0
        self.shown_at = -math.inf  # the first step is shown at once

    def step(self, sums: dict[str, torch.Tensor]) -> None:
        self.steps_done += 1
        if self.bar.disable or monotonic() - self.shown_at < REFRESH_SECONDS:
            return
        names = [name for name in SHOWN if name in sums]
        means = torch.stack([sums[name] for name in names]).div(self.steps_done).tolist()
        postfix = {name: f"{mean:.4f}" for name, mean in zip(names, means, strict=True)}
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.update(self.steps_done - self.bar.n)
        self.shown_at = monotonic()

    def __enter__(self) -> EpochBar:
        return self

    def __exit__(self, *exc_info) -> None:
        self.bar.close()
