"""Denoised smoothing: the denoised base classifier, one-shot DDPM denoising, the DnCNN denoiser
and its two training objectives (Salman et al. 2020; Carlini, Tramèr et al. 2023)."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from torch import nn

from smoothcert.checkpoints import load_checkpoint
from smoothcert.denoise import (
    EXTRA_MESSAGE,
    Denoised,
    DiffusionDenoiser,
    diffusion_timestep,
)
from smoothcert.extras import MissingExtraError
from smoothcert.io import WEIGHTS_DIGEST, save_checkpoint, weights_digest
from smoothcert.models import build_model
from smoothcert.models.dncnn import DnCNN
from smoothcert.objectives import ObjectiveConfig, get_objective, trains_denoiser

# isort: split
from smoothcert.denoiser_objectives import StabilityConfig, frozen_classifier
from smoothcert.presets import resolve_config
from smoothcert.smooth import Smooth
from smoothcert.train import train

diffusers = pytest.importorskip("diffusers")


def tiny_unet(out_channels: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )


@pytest.fixture(scope="module")
def ddpm_folders(tmp_path_factory):
    """The same tiny random DDPM saved flat and as a pipeline (unet/ and scheduler/)."""
    root = tmp_path_factory.mktemp("ddpm")
    unet, scheduler = tiny_unet(), diffusers.DDPMScheduler(num_train_timesteps=1000)
    unet.save_pretrained(root / "flat")
    scheduler.save_pretrained(root / "flat")
    unet.save_pretrained(root / "pipeline" / "unet")
    scheduler.save_pretrained(root / "pipeline" / "scheduler")
    return root / "flat", root / "pipeline"


def first_reaching(alphas: list[float], sigma: float) -> int:
    """t* written out: the first t with sqrt((1 - a_t) / a_t) >= 2 sigma."""
    for t, a in enumerate(alphas):
        if math.sqrt((1 - a) / a) >= 2 * sigma:
            return t
    raise AssertionError("not reached")


@pytest.mark.parametrize("sigma", [0.01, 0.12, 0.25, 0.5, 1.0, 2.0])
def test_the_timestep_is_the_first_whose_noise_level_reaches_two_sigma(sigma):
    alphas = diffusers.DDPMScheduler(num_train_timesteps=1000).alphas_cumprod
    t = diffusion_timestep(alphas, sigma)
    assert t == first_reaching(alphas.tolist(), sigma)
    level = ((1 - alphas) / alphas).sqrt()
    assert level[t] >= 2 * sigma and (t == 0 or level[t - 1] < 2 * sigma)


def test_the_timestep_is_the_first_at_or_above_not_the_closest():
    # Noise levels 0.1, 0.9, 1.0 (exactly 2 sigma for sigma 0.5), 3.0: a = 1 / (1 + level^2).
    alphas = [1 / (1 + level**2) for level in (0.1, 0.9, 1.0, 3.0)]
    assert diffusion_timestep(alphas, 0.5) == 2
    # 2 sigma = 1.02: 1.0 is the closest level, 3.0 the first that reaches it.
    assert diffusion_timestep(alphas, 0.51) == 3


@pytest.mark.parametrize(("alphas", "sigma", "match"), [
    ([0.9, 0.5], 1.0, r"sigma: 1.0 is beyond the diffusion schedule.*at most 0\.5"),
    ([0.9, 0.5], 0.0, "sigma must be a finite number > 0"),
    ([0.9, 0.5], math.nan, "sigma must be a finite number > 0"),
    ([0.9, 0.0], 0.1, r"alphas_cumprod .* \(0, 1\]"),
    ([], 0.1, "alphas_cumprod"),
])
def test_bad_timestep_arguments_are_refused_by_name(alphas, sigma, match):
    with pytest.raises(ValueError, match=match):
        diffusion_timestep(alphas, sigma)


class ConstantNoise(nn.Module):
    """A noise predictor returning `value` (and 9 in any further channels); records the
    timesteps and shapes it was given."""

    def __init__(self, value: float, channels_factor: int = 1):
        super().__init__()
        self.value, self.factor, self.timesteps, self.shapes = value, channels_factor, [], []

    def forward(self, x, t):
        self.timesteps.append(t)
        self.shapes.append(tuple(x.shape))
        out = torch.full((x.shape[0], x.shape[1] * self.factor, *x.shape[2:]), self.value)
        out[:, x.shape[1]:] = 9.0  # a learned variance's channels, after the noise's
        return out


def test_one_shot_denoising_scales_in_and_out_as_the_equations_say():
    alphas = [0.99, 0.9, 0.6, 0.3]
    sigma = 0.3  # levels 0.10, 0.33, 0.82, 1.53: t* = 2, a = 0.6
    unet = ConstantNoise(0.2)
    denoiser = DiffusionDenoiser(unet, alphas, sigma)
    x = torch.rand(2, 3, 4, 4)
    a = 0.6
    x_t = math.sqrt(a) * (2 * x - 1)
    x0 = ((x_t - math.sqrt(1 - a) * 0.2) / math.sqrt(a)).clamp(-1, 1)
    torch.testing.assert_close(denoiser(x), (x0 + 1) / 2)
    assert denoiser.timestep == 2 and unet.timesteps[0].tolist() == [2, 2]


def test_a_learned_variance_output_uses_its_first_channels_as_the_noise():
    x = torch.rand(2, 3, 4, 4)
    plain = DiffusionDenoiser(ConstantNoise(0.2), [0.9, 0.5], 0.25)(x)
    torch.testing.assert_close(DiffusionDenoiser(ConstantNoise(0.2, 2), [0.9, 0.5], 0.25)(x), plain)


def test_a_unet_predicting_something_else_is_refused():
    expected = r"unet must predict the noise .*: 3 channels \(or 6 .*got \(1, 9, 4, 4\)"
    with pytest.raises(ValueError, match=expected):
        DiffusionDenoiser(ConstantNoise(0.0, 3), [0.9, 0.5], 0.25)(torch.rand(1, 3, 4, 4))


def test_a_resolution_of_its_own_is_resized_in_and_out():
    unet = ConstantNoise(0.0)
    denoiser = DiffusionDenoiser(unet, [0.9, 0.5], 0.25, image_size=8)
    x = torch.rand(2, 3, 4, 4)
    out = denoiser(x)
    assert unet.shapes == [(2, 3, 8, 8)] and out.shape == x.shape
    up = nn.functional.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)
    expected = nn.functional.interpolate(up.clamp(0, 1), size=(4, 4), mode="bilinear",
                                         antialias=True)
    torch.testing.assert_close(out, expected)
    denoiser(torch.rand(1, 3, 8, 8))
    assert unet.shapes[-1] == (1, 3, 8, 8)


@pytest.mark.parametrize("layout", [0, 1], ids=["flat", "pipeline"])
def test_a_saved_ddpm_loads_from_either_layout(ddpm_folders, layout):
    denoiser = DiffusionDenoiser.from_pretrained(ddpm_folders[layout], 0.25)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000)
    assert denoiser.timestep == diffusion_timestep(scheduler.alphas_cumprod, 0.25)
    assert denoiser.image_size == (8, 8) and not denoiser.training
    expected = tiny_unet().state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in denoiser.unet.state_dict().items())


def test_a_unet_predicting_no_noise_is_the_identity_on_images(ddpm_folders):
    denoiser = DiffusionDenoiser.from_pretrained(ddpm_folders[0], 0.5)
    nn.init.zeros_(denoiser.unet.conv_out.weight)
    nn.init.zeros_(denoiser.unet.conv_out.bias)
    x = torch.rand(3, 3, 8, 8)
    x[0, 0, 0, :2] = torch.tensor([0.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(denoiser(x), x, rtol=0, atol=1e-6)


def test_one_shot_denoising_runs_under_bf16_autocast_and_channels_last(ddpm_folders):
    denoiser = DiffusionDenoiser.from_pretrained(ddpm_folders[0], 0.25)
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        expected = denoiser(x)
        last = denoiser.to(memory_format=torch.channels_last)
        got = last(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = denoiser(x)
    assert half.shape == x.shape and bool(((half >= 0) & (half <= 1)).all())
    assert (half.float() - expected).abs().max() < 0.1


def test_missing_or_unrecognised_folders_are_refused_by_name(tmp_path, ddpm_folders):
    with pytest.raises(ValueError, match="denoiser: '.*nowhere' is not a folder"):
        DiffusionDenoiser.from_pretrained(tmp_path / "nowhere", 0.25)
    with pytest.raises(ValueError, match="neither config.json .* nor unet/ and scheduler/"):
        DiffusionDenoiser.from_pretrained(tmp_path, 0.25)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="does not hold a loadable diffusers UNet2DModel"):
        DiffusionDenoiser.from_pretrained(tmp_path, 0.25)


def test_a_ddpm_that_does_not_predict_the_noise_is_refused(tmp_path, ddpm_folders):
    folder = tmp_path / "v"
    tiny_unet().save_pretrained(folder)
    diffusers.DDPMScheduler(prediction_type="v_prediction").save_pretrained(folder)
    with pytest.raises(ValueError, match="predicts 'v_prediction'.*'epsilon'"):
        DiffusionDenoiser.from_pretrained(folder, 0.25)


def test_missing_diffusers_names_the_extra(monkeypatch, ddpm_folders):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(MissingExtraError) as err:
        DiffusionDenoiser.from_pretrained(ddpm_folders[0], 0.25)
    assert str(err.value) == EXTRA_MESSAGE
    assert "pip install 'smoothcert[diffusion]'" in EXTRA_MESSAGE
    assert isinstance(err.value, ImportError) and isinstance(err.value, ValueError)


class Scale(nn.Module):
    """D(x) = w·x, a denoiser whose losses are easy to write out."""

    def __init__(self, w: float):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return self.w * x


def test_denoised_classifies_the_denoisers_output_and_passes_modes_and_formats_on():
    torch.manual_seed(0)
    classifier = build_model("cifar_resnet20", "cifar10")
    model = Denoised(Scale(0.5), classifier).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), classifier(0.5 * x))
        assert model.train().denoiser.training and classifier[1].bn1.training
        assert not model.eval().denoiser.training and not classifier[1].bn1.training
        last = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(last(x.contiguous(memory_format=torch.channels_last)),
                                   classifier(0.5 * x), rtol=1e-4, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(x).shape == (2, 10)


def test_dncnn_is_a_residual_denoiser_of_pixels_without_standardisation():
    model = build_model("dncnn", "cifar10")
    assert model[0].mean.tolist() == [0.0] and model[0].std.tolist() == [1.0]
    body = model[1]
    assert isinstance(body, DnCNN) and len([m for m in body.modules()
                                           if isinstance(m, nn.Conv2d)]) == 17
    assert body.noise[0].out_channels == 64
    nn.init.zeros_(body.noise[-1].weight)
    nn.init.zeros_(body.noise[-1].bias)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), x)
    assert build_model("dncnn_small", "mnist")(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)
    with pytest.raises(ValueError, match="depth must be an integer >= 2"):
        DnCNN(3, depth=1)


def noise_of(x: torch.Tensor, k: int, sigma: float = 0.25) -> torch.Tensor:
    return sigma * torch.randn(x.shape[0], k, *x.shape[1:])


def test_denoiser_mse_is_the_mean_squared_error_per_pixel():
    x = torch.rand(2, 1, 3, 3)
    noise = noise_of(x, 3)
    cfg = ObjectiveConfig(k=3)
    loss, terms = get_objective("denoiser-mse")(Scale(0.8), x, torch.zeros(2), noise, cfg)
    squares = [(0.8 * float(x[i, 0, r, c] + noise[i, j, 0, r, c]) - float(x[i, 0, r, c])) ** 2
               for i in range(2) for j in range(3) for r in range(3) for c in range(3)]
    assert loss.item() == pytest.approx(sum(squares) / len(squares), rel=1e-6)
    assert set(terms) == {"mse"} and trains_denoiser("denoiser-mse")


def test_a_denoiser_objective_refuses_a_model_that_does_not_return_images():
    x = torch.rand(2, 1, 28, 28)
    with pytest.raises(ValueError, match=r"returns images of its input's shape \(2, 1, 28, 28\)"):
        get_objective("denoiser-mse")(build_model("lenet", "mnist"), x, torch.zeros(2),
                                      noise_of(x, 1), ObjectiveConfig())


@pytest.fixture
def classifier_checkpoint(tmp_path):
    torch.manual_seed(1)
    weights = build_model("lenet", "mnist").state_dict()
    path = tmp_path / "classifier.pt"
    save_checkpoint(path, {"model": weights, WEIGHTS_DIGEST: weights_digest(weights),
                           "config": {"model": "lenet", "dataset": "mnist", "sigma": 0.0}})
    return path


def test_denoiser_stability_is_the_classifiers_cross_entropy_against_its_clean_prediction(
        classifier_checkpoint):
    classifier = load_checkpoint(classifier_checkpoint)
    x = torch.rand(2, 1, 28, 28)
    noise = noise_of(x, 2, sigma=0.5)
    y = torch.tensor([3, 4])
    cfg = StabilityConfig(k=2, classifier=str(classifier_checkpoint))
    loss, terms = get_objective("denoiser-stability")(Scale(0.7), x, y, noise, cfg)
    with torch.no_grad():
        ces, hits = [], []
        for i in range(2):
            target = int(classifier(x[i:i + 1]).argmax())
            for j in range(2):
                logits = classifier(0.7 * (x[i:i + 1] + noise[i, j:j + 1]))[0].double()
                ces.append(float(torch.logsumexp(logits, 0) - logits[target]))
                hits.append(float(int(logits.argmax()) == int(y[i])))
    assert loss.item() == pytest.approx(sum(ces) / 4, rel=1e-5)
    assert terms["acc"].item() == pytest.approx(sum(hits) / 4)
    assert terms["mse"].item() == pytest.approx(
        float(((0.7 * (x.unsqueeze(1) + noise) - x.unsqueeze(1)) ** 2).mean()), rel=1e-6)


def test_no_gradient_reaches_the_frozen_classifier(classifier_checkpoint):
    x = torch.rand(4, 1, 28, 28)
    denoiser = Scale(0.9)
    cfg = StabilityConfig(k=2, classifier=str(classifier_checkpoint))
    classifier = frozen_classifier(classifier_checkpoint, "cpu")
    before = {k: v.clone() for k, v in classifier.state_dict().items()}
    optimizer = torch.optim.SGD(denoiser.parameters(), lr=0.5)
    loss, _ = get_objective("denoiser-stability")(denoiser, x, torch.zeros(4), noise_of(x, 2), cfg)
    loss.backward()
    optimizer.step()
    assert denoiser.w.grad is not None and denoiser.w.item() != pytest.approx(0.9)
    assert not classifier.training
    assert all(p.grad is None and not p.requires_grad for p in classifier.parameters())
    assert all(torch.equal(v, before[k]) for k, v in classifier.state_dict().items())


def test_denoiser_stability_needs_a_readable_classifier(tmp_path):
    base = dict(model="dncnn_small", objective="denoiser-stability", out=str(tmp_path / "r"))
    with pytest.raises(ValueError, match="classifier: objective denoiser-stability needs "
                                         "--classifier CKPT"):
        resolve_config(**base)
    with pytest.raises(ValueError, match="classifier: cannot read '.*missing.pt'"):
        resolve_config(**base, classifier=str(tmp_path / "missing.pt"))
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="classifier: checkpoint: '.*notes.pt' is not a PyTorch"):
        resolve_config(**base, classifier=str(tmp_path / "notes.pt"))
    with pytest.raises(ValueError, match="classifier is read by objective denoiser-stability"):
        resolve_config(objective="gaussian", classifier="c.pt", out=str(tmp_path / "r"))


def test_smoothing_an_identity_denoiser_certifies_as_the_classifier_alone():
    torch.manual_seed(0)
    classifier = build_model("lenet", "mnist").eval()
    denoiser = build_model("dncnn_small", "mnist").eval()
    nn.init.zeros_(denoiser[1].noise[-1].weight)
    nn.init.zeros_(denoiser[1].noise[-1].bias)
    x = torch.rand(1, 28, 28)
    results = [Smooth(model, 10, 0.25).certify(x, 20, 100, 0.01, 60,
                                                generator=torch.Generator().manual_seed(5))
               for model in (Denoised(denoiser, classifier), classifier)]
    assert results[0] == results[1]


def test_a_ddpm_denoiser_behind_smooth_certifies(ddpm_folders):
    classifier = build_model("cifar_resnet20", "cifar10").eval()
    model = Denoised(DiffusionDenoiser.from_pretrained(ddpm_folders[1], 0.25), classifier)
    label, radius = Smooth(model, 10, 0.25).certify(torch.rand(3, 16, 16), 4, 16, 0.01, 8,
                                                    generator=torch.Generator().manual_seed(0))
    assert label == -1 or radius >= 0


def test_training_a_dncnn_with_denoiser_mse_logs_its_error_and_loads_back(tmp_path):
    cfg = resolve_config(model="dncnn_small", objective="denoiser-mse", sigma=0.25, epochs=1,
                         batch=16, lr=0.01, train_subset=32, eval_subset=16, device="cpu",
                         out=str(tmp_path / "run"))
    checkpoint = train(cfg, progress=False)
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").open()]
    assert {"loss", "mse", "test_clean_mse", "test_noisy_mse"} <= set(record)
    assert "train_acc" not in record and record["test_noisy_mse"] > 0
    model = load_checkpoint(checkpoint)
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 1, 28, 28)


@pytest.mark.parametrize(("model", "objective", "match"), [
    ("lenet", "denoiser-mse", "objective denoiser-mse trains a denoiser .* lenet is not one"),
    ("dncnn_small", "gaussian", "objective gaussian trains a classifier .* dncnn_small is not"),
])
def test_a_model_that_does_not_fit_the_objective_is_refused_before_writing(
        tmp_path, model, objective, match):
    cfg = resolve_config(model=model, objective=objective, epochs=1, train_subset=16,
                         eval_subset=0, device="cpu", out=str(tmp_path / "run"))
    with pytest.raises(ValueError, match=match):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "config.json").exists()
