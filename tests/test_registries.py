"""The objective and model registries: one decorated function (and config) is a new choice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import asdict, dataclass, fields

import pytest
import torch
from test_cli_options import run
from test_imports import imported

from smoothcert import objectives
from smoothcert.attacks import noisy_logits
from smoothcert.models import MODELS, build_model, list_models, register_model
from smoothcert.objectives import (
    CommonConfig,
    gaussian_ce,
    list_objectives,
    objective_config_class,
    register_objective,
)
from smoothcert.presets import TrainConfig, choices, resolve_config
from smoothcert.train import CHECKPOINT, CONFIG, train

# The keys of config.json (and of a checkpoint's config) as smoothcert wrote them before the
# objectives had configs of their own, in that release's order.
EARLIER_CONFIG_KEYS = [
    "dataset", "model", "objective", "sigma", "lam", "k", "single_draw", "eps", "steps",
    "eps_warmup", "label_smoothing", "adre_floor", "macer_lam", "macer_beta", "macer_gamma",
    "consistency_lam", "consistency_eta", "smoothmix_eta", "smoothmix_step", "smoothmix_mix_step",
    "macer_defer", "epochs", "batch", "lr", "momentum", "weight_decay", "schedule", "lr_step",
    "lr_gamma", "warmup_epochs", "train_subset", "eval_subset", "data_dir", "download", "workers",
    "seed", "device", "amp", "channels_last", "out", "preset",
]
# Options added since: configs without them resume (test below).
NEWER_CONFIG_KEYS = ["classifier",  # denoiser-stability's frozen classifier (issue 24)
                     "data_file", "image_size", "mean", "std", "model_kwargs",  # issue 23
                     "init"]  # train --init: fine-tuning (Study 7)


def test_every_objective_has_its_config_and_every_option_is_a_train_option():
    names = {f.name for f in fields(TrainConfig)}
    assert tuple(list_objectives()) == choices()["objective"]
    for objective in list_objectives():
        config = objective_config_class(objective)
        assert issubclass(config, CommonConfig)
        assert {f.name for f in fields(config)} - {"warmup"} <= names
        assert all(f.metadata.get("help") for f in fields(config) if f.name != "warmup")


@pytest.mark.parametrize("command", ["objectives", "models"])
def test_a_listing_without_torch_prints_what_the_registry_holds(capsys, command):
    """catalogue.py's copy of the built-in registries (a new built-in without its entry fails)."""
    names, done = imported("-m", "smoothcert", command)
    assert done.returncode == 0 and not names & {"torch", "torchvision"}, done.stderr[-2000:]
    code, out, _ = run(capsys, command)  # this process has imported the registries
    assert code == 0 and done.stdout == out


def test_train_help_of_an_objective_lists_only_its_options(capsys):
    code, out, _ = run(capsys, "train", "--objective", "smoothmix", "--help")
    assert code == 0
    assert "options of objective smoothmix" in out
    assert "--smoothmix-eta" in out and "(default 5.0)" in out and "--steps" in out
    assert "--k " in out  # a setting of every objective
    assert "--macer-lam" not in out and "--lam" not in out


def test_an_option_of_another_objective_is_still_refused_by_name(capsys):
    code, _, err = run(capsys, "train", "--objective", "gaussian", "--macer-lam", "3",
                       "--device", "cpu")
    assert code == 2 and "macer_lam is read by objective macer only" in err


def test_an_objective_with_a_field_that_contradicts_another_is_refused(registry):
    from dataclasses import field

    @dataclass(frozen=True)
    class Clash(CommonConfig):
        lam: float = field(default=1.0, metadata={"help": "another default"})

    with pytest.raises(ValueError, match="field lam differs"):
        register_objective("clash", config=Clash)(lambda *args: None)
    assert "clash" not in list_objectives()


def test_a_registered_model_is_a_choice_and_builds():
    @register_model("toy_linear")
    def toy_linear(num_classes: int = 10, in_channels: int = 1) -> torch.nn.Module:
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))

    try:
        assert list_models()[-1] == "toy_linear"
        assert resolve_config(model="toy_linear").model == "toy_linear"  # TrainConfig accepts it
        assert build_model("toy_linear", "mnist")(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
        with pytest.raises(ValueError, match="already registered"):
            register_model("toy_linear")(toy_linear)
    finally:
        del MODELS["toy_linear"]


TINY = dict(k=2, epochs=1, batch=64, train_subset=64, eval_subset=0, device="cpu")


@pytest.fixture
def registry(monkeypatch):
    """The objectives' registry, restored after the test."""
    monkeypatch.setattr(objectives, "_REGISTRY", dict(objectives._REGISTRY))
    monkeypatch.setattr(objectives, "OBJECTIVES", dict(objectives.OBJECTIVES))


def test_a_toy_objective_in_one_place_is_trainable_and_a_train_choice(registry, tmp_path,
                                                                      capsys):
    @dataclass(frozen=True)
    class ToyConfig(CommonConfig):
        """Gaussian augmentation's settings."""

    @register_objective("toy", config=ToyConfig)
    def toy(model, x, y, noise, cfg: ToyConfig):
        """Half of Gaussian augmentation's loss."""
        return gaussian_ce(noisy_logits(model, x, noise), y) / 2, {}

    code, out, _ = run(capsys, "train", "--objective", "toy", "--help")
    assert code == 0 and "toy" in out.split("--objective")[1].split("}")[0]  # among the choices
    code, out, _ = run(capsys, "objectives")
    assert ["toy", "Half of Gaussian augmentation's loss."] in [
        line.split(None, 1) for line in out.splitlines()]
    train(resolve_config(objective="toy", out=str(tmp_path / "run"), **TINY), progress=False)
    config = json.loads((tmp_path / "run" / CONFIG).read_text())
    log = (tmp_path / "run" / "log.jsonl").read_text().splitlines()
    assert config["objective"] == "toy" and json.loads(log[0])["loss"] > 0


PLUGIN = textwrap.dedent('''
    import sys
    from dataclasses import dataclass, field

    from smoothcert.objectives import CommonConfig, get_objective, register_objective


    @dataclass(frozen=True)
    class ScaledConfig(CommonConfig):
        scale: float = field(default=1.0, metadata={"help": "scale of the loss"})


    @register_objective("scaled", config=ScaledConfig)
    def scaled(model, x, y, noise, cfg):
        """Gaussian augmentation's loss times scale."""
        loss, terms = get_objective("gaussian")(model, x, y, noise, cfg)
        return cfg.scale * loss, terms


    from smoothcert.cli import main  # imported after the registration, as a plugin is

    sys.exit(main(sys.argv[1:]))
''')


@pytest.mark.slow  # a process that imports torch and trains: 10 to 25 s on 2 shared cores
def test_a_plugin_objective_s_own_option_is_a_train_option(tmp_path):
    script = tmp_path / "plugin.py"
    script.write_text(PLUGIN)
    tiny = ["--k", "2", "--epochs", "1", "--batch", "64", "--train-subset", "64",
            "--eval-subset", "0", "--device", "cpu", "--no-progress"]
    done = subprocess.run([sys.executable, str(script), "train", "--objective", "scaled",
                           "--scale", "0.5", *tiny, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / CONFIG).read_text())
    assert (config["objective"], config["scale"]) == ("scaled", 0.5)


def test_the_config_keys_are_those_earlier_releases_wrote():
    assert sorted(asdict(TrainConfig())) == sorted(EARLIER_CONFIG_KEYS + NEWER_CONFIG_KEYS)


def test_a_run_with_an_earlier_release_s_config_resumes(tmp_path):
    out = tmp_path / "run"
    train(resolve_config(objective="adre", lam=0.1, out=str(out), **TINY), progress=False)
    state = torch.load(out / CHECKPOINT, weights_only=True)
    state["config"] = {key: state["config"][key] for key in EARLIER_CONFIG_KEYS}
    torch.save(state, out / CHECKPOINT)
    (out / CONFIG).write_text(json.dumps(state["config"]))
    cfg = resolve_config(objective="adre", lam=0.1, out=str(out), **{**TINY, "epochs": 2})
    train(cfg, resume=True, progress=False)
    assert torch.load(out / CHECKPOINT, weights_only=True)["epoch"] == 2
