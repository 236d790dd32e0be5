"""Result files written by smoothcert before the protocol/sidecar reshape (tests/fixtures/),
and the tiny run that wrote them: a threshold model on the shipped MNIST, small n.

    PYTHONPATH=src python tests/result_fixtures.py   # rewrite the fixtures (only on purpose)
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures"
CHECKPOINT = "tiny-checkpoint.bin"  # its bytes are hashed into the run; the model is patched in
THRESHOLDS = [-1.5, -1.2, -0.9, 0.9, 1.1, 1.3, 1.5, 1.7, 1.9]  # 10 classes, mostly class 3
COMMON = dict(n0=10, n=50, batch=50, max=4, skip=3, device="cpu", sigma=0.5, dataset="mnist")
# Each fixture: its file name and the RunConfig options that wrote it.
RUNS = {
    "both.tsv": dict(method="both"),
    "tcertify.tsv": dict(method="tcertify"),
    "predict.tsv": dict(mode="predict"),
    # written before the final look and the futility rule (issue 26): final_share 0 and
    # futility "none" are that procedure
    "radii.tsv": dict(radii=(0.0, 0.25), max_n=200, method="tcertify", final_share=0.0,
                      futility="none"),
    "adaptive.tsv": dict(adaptive_n=True, max_n=200, method="certify", tolerance=0.05),
}


def tiny_model(*_args, **_kwargs):
    """What `loading.load` gives for the tiny checkpoint: a smoothcert-format threshold model."""
    sys.path.insert(0, str(HERE))
    from conftest import ThresholdClassifier

    from smoothcert.loading import Loaded

    return Loaded(ThresholdClassifier(THRESHOLDS), COMMON["sigma"], len(THRESHOLDS) + 1, "mnist",
                  None, {}, "smoothcert")


def run_fixture(name: str, folder: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Path:
    """Run the fixture `name`'s protocol into `folder/name` (folder holds the checkpoint)."""
    from smoothcert import runner, sources

    patch = monkeypatch or pytest.MonkeyPatch()
    patch.setattr(sources, "load", tiny_model)
    patch.chdir(folder)
    try:
        cfg = runner.RunConfig(checkpoint=CHECKPOINT, out=name, **COMMON, **RUNS[name])
        return folder / runner.run(cfg, progress=False)
    finally:
        if monkeypatch is None:
            patch.undo()


if __name__ == "__main__":
    FIXTURES.mkdir(exist_ok=True)
    (FIXTURES / CHECKPOINT).write_bytes(b"smoothcert test fixture: a ThresholdClassifier\n")
    for fixture in RUNS:
        for stale in (FIXTURES / fixture, FIXTURES / f"{fixture}.json"):
            stale.unlink(missing_ok=True)
        print(run_fixture(fixture, FIXTURES))
