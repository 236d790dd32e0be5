"""Non-finite training hyper-parameters are refused: inf or NaN passes every range check."""

from __future__ import annotations

import dataclasses

import pytest

from smoothcert.cli import main
from smoothcert.presets import TrainConfig

FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainConfig) if f.type == "float"]


def test_the_float_fields_include_the_optimiser_settings():
    assert {"lr", "weight_decay", "lr_gamma", "momentum", "sigma", "lam"} <= set(FLOAT_FIELDS)


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")])
def test_non_finite_float_fields_are_refused(name, value):
    with pytest.raises(ValueError, match=f"^{name} must be a finite number, got {value}"):
        TrainConfig(**{name: value}).validate()


def test_train_with_an_infinite_learning_rate_stops_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["--no-progress", "train", "--preset", "mnist-lenet", "--lr", "inf", "--out", str(out)]
    assert main(argv) == 2
    assert "smoothcert train: error: lr must be a finite number, got inf" in capsys.readouterr().err
    assert not out.exists()
