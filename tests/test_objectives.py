import itertools
import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import norm
from torch import nn

import smoothcert
from smoothcert.attacks import smooth_pgd_l2, smoothed_log_probs
from smoothcert.cli import main as cli_main
from smoothcert.io import read_checkpoint_state
from smoothcert.objectives import (
    OBJECTIVES,
    ObjectiveConfig,
    adre_loss,
    consistency_loss,
    gaussian_ce,
    get_objective,
    macer_loss,
    smoothmix_loss,
    trains_denoiser,
)
from smoothcert.presets import resolve_config

SHAPE = (1, 4, 4)
D = 16


def reference_adre(logits, y, lam, label_smoothing=0.0, draws=None):
    """Algorithm 1 written with an explicit loop over examples i and draws j, on probabilities.

    `draws[i]` is the one draw used for l_per (single-draw variant); None uses all k draws.
    """
    b, k, c = logits.shape
    total, l_pers, l_adres = 0.0, [], []
    for i in range(b):
        yi = int(y[i])
        probs = [torch.softmax(logits[i, j].double(), dim=0) for j in range(k)]
        ces = []
        for p in probs:
            smooth = sum(-math.log(p[cls]) for cls in range(c)) / c
            ces.append((1 - label_smoothing) * -math.log(p[yi]) + label_smoothing * smooth)
        l_per = sum(ces) / k if draws is None else ces[int(draws[i])]
        g = sum(probs) / k
        y_hat = max((cls for cls in range(c) if cls != yi), key=lambda cls: g[cls])
        l_adre = -math.log(g[y_hat])
        total += l_per - lam * l_adre
        l_pers.append(l_per)
        l_adres.append(l_adre)
    return total / b, sum(l_pers) / b, sum(l_adres) / b


def random_problem(b, k, c, seed=0, scale=3.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, k, c, generator=g, dtype=dtype)
    y = torch.randint(c, (b,), generator=g)
    return logits, y


@pytest.mark.parametrize(("k", "c"), [(1, 2), (1, 10), (4, 3), (8, 10)])
@pytest.mark.parametrize("lam", [0.0, 0.1, 0.5, 2.0])
def test_adre_loss_matches_loop(k, c, lam):
    logits, y = random_problem(5, k, c)
    loss, terms = adre_loss(logits, y, lam)
    ref, ref_per, ref_adre = reference_adre(logits, y, lam)
    assert loss.item() == pytest.approx(ref, rel=1e-10, abs=1e-10)
    assert terms["l_per"].item() == pytest.approx(ref_per, rel=1e-10)
    assert terms["l_adre"].item() == pytest.approx(ref_adre, rel=1e-10)
    assert not terms["l_per"].requires_grad and not terms["l_adre"].requires_grad


def test_label_smoothing_applies_to_l_per_only():
    logits, y = random_problem(4, 3, 6)
    loss, terms = adre_loss(logits, y, 0.3, label_smoothing=0.1)
    ref, ref_per, ref_adre = reference_adre(logits, y, 0.3, label_smoothing=0.1)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    assert terms["l_per"].item() == pytest.approx(ref_per, rel=1e-10)
    assert terms["l_adre"].item() == pytest.approx(ref_adre, rel=1e-10)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("k", [1, 8])
def test_lam_zero_is_gaussian_augmentation_exactly(k, label_smoothing):
    logits, y = random_problem(16, k, 10, dtype=torch.float32)
    logits.requires_grad_(True)
    loss, _ = adre_loss(logits, y, 0.0, label_smoothing=label_smoothing)
    gaussian = F.cross_entropy(
        logits.flatten(0, 1), y.repeat_interleave(k), label_smoothing=label_smoothing
    )
    assert torch.equal(loss, gaussian)
    (grad,) = torch.autograd.grad(loss, logits)
    (grad_ref,) = torch.autograd.grad(gaussian, logits)
    assert torch.equal(grad, grad_ref)


@pytest.mark.parametrize("lam", [0.0, 0.4])
def test_single_draw_uses_one_draw_per_example(lam):
    b, k = 3, 3
    logits, y = random_problem(b, k, 4)
    candidates = [
        reference_adre(logits, y, lam, draws=d)[0] for d in itertools.product(range(k), repeat=b)
    ]
    seen = set()
    for seed in range(12):
        loss, _ = adre_loss(
            logits, y, lam, single_draw=True, generator=torch.Generator().manual_seed(seed)
        )
        matches = [i for i, ref in enumerate(candidates) if abs(loss.item() - ref) < 1e-10]
        assert len(matches) == 1
        seen.add(matches[0])
        again, _ = adre_loss(
            logits, y, lam, single_draw=True, generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(loss, again)
    assert len(seen) > 1  # the draw is random, not always the same j


def test_single_draw_with_one_draw_is_the_full_loss():
    logits, y = random_problem(6, 1, 5)
    single, _ = adre_loss(logits, y, 0.3, single_draw=True, generator=torch.Generator())
    full, _ = adre_loss(logits, y, 0.3)
    torch.testing.assert_close(single, full)


def test_k_one_smoothed_classifier_is_one_softmax():
    logits, y = random_problem(6, 1, 5)
    _, terms = adre_loss(logits, y, 0.5)
    probs = torch.softmax(logits[:, 0], dim=-1).scatter(1, y.unsqueeze(1), -1.0)
    expected = -torch.log(probs.max(dim=1).values).mean()
    torch.testing.assert_close(terms["l_adre"], expected)


def runner_up_prob(logits, y):
    g = torch.exp(smoothed_log_probs(logits))
    return g.scatter(1, y.unsqueeze(1), -1.0).max(dim=1).values


def test_regulariser_step_lowers_runner_up_probability():
    logits, y = random_problem(8, 4, 6, scale=1.0)
    logits.requires_grad_(True)
    lam = 1.0
    regulariser = adre_loss(logits, y, lam)[0] - adre_loss(logits, y, 0.0)[0]  # −lam·l_adre
    (grad,) = torch.autograd.grad(regulariser, logits)
    with torch.no_grad():
        before = runner_up_prob(logits, y)
        after = runner_up_prob(logits - 0.5 * grad, y)
    assert (after < before).all()


def test_regulariser_step_through_a_model_lowers_runner_up_probability():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic(b=16, k=4)
    cfg_reg, cfg_plain = ObjectiveConfig(lam=1.0, k=4), ObjectiveConfig(k=4)
    loss = get_objective("adre")(model, x, y, noise, cfg_reg)[0]
    loss = loss - get_objective("gaussian")(model, x, y, noise, cfg_plain)[0]
    loss.backward()

    def mean_runner_up():
        with torch.no_grad():
            logits = model((x.unsqueeze(1) + noise).flatten(0, 1)).view(16, 4, -1)
            return runner_up_prob(logits, y).mean()

    before = mean_runner_up()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    assert mean_runner_up() < before


@pytest.mark.parametrize("single_draw", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_huge_logits_are_stable(k, single_draw):
    g = torch.Generator().manual_seed(0)
    logits = (1e4 * torch.sign(torch.randn(6, k, 10, generator=g))).requires_grad_(True)
    y = torch.randint(10, (6,), generator=g)
    loss, terms = adre_loss(logits, y, 0.5, single_draw=single_draw, generator=g)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(terms["l_per"]) and torch.isfinite(terms["l_adre"])


# --- the method registry -------------------------------------------------------------------


def synthetic(b=32, k=4, c=5, sigma=0.25, seed=0):
    """A small separable problem: class = which block of pixels is bright."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(c, (b,), generator=g)
    x = 0.2 * torch.rand(b, D, generator=g)
    block = D // c
    for i in range(b):
        x[i, y[i] * block : (y[i] + 1) * block] += 0.6
    noise = sigma * torch.randn(b, k, *SHAPE, generator=g)
    return x.view(b, *SHAPE), y, noise


CONFIGS = {
    "gaussian": ObjectiveConfig(k=4),
    "adre": ObjectiveConfig(lam=0.2, k=4),
    "smoothadv": ObjectiveConfig(k=4, eps=0.5, steps=2),
    "adreadv": ObjectiveConfig(lam=0.2, k=4, eps=0.5, steps=2),
    "macer": ObjectiveConfig(k=4, macer_lam=2.0, macer_beta=4.0),
    "consistency": ObjectiveConfig(k=4, consistency_lam=2.0, consistency_eta=0.5),
    "smoothmix": ObjectiveConfig(k=4, steps=2, smoothmix_step=0.5, smoothmix_eta=2.0),
}
TERMS = {  # what each method logs besides acc
    "gaussian": {"l_per"},  # lam 0: no ADRE term
    "adre": {"l_per", "l_adre"},
    "smoothadv": {"l_per"},
    "adreadv": {"l_per", "l_adre"},
    "macer": {"l_per", "l_macer"},
    "consistency": {"l_per", "l_adre", "l_kl", "l_ent"},
    "smoothmix": {"l_per", "l_mix"},
}


def test_registry_names():
    classifiers = {name for name in OBJECTIVES if not trains_denoiser(name)}  # test_denoise's
    assert classifiers == set(CONFIGS) == set(TERMS)
    for name, fn in OBJECTIVES.items():
        assert get_objective(name) is fn
    with pytest.raises(ValueError, match="gaussian"):
        get_objective("stability")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_returns_differentiable_loss_and_terms(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    loss, terms = get_objective(name)(model, x, y, noise, CONFIGS[name])
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert set(terms) == TERMS[name] | {"acc"}
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())
    assert 0 <= terms["acc"].item() <= 1
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gaussian_method_equals_adre_with_lam_zero_and_smoothadv_with_eps_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    gauss = get_objective("gaussian")(model, x, y, noise, ObjectiveConfig(k=4))[0]
    assert torch.equal(gauss, get_objective("adre")(model, x, y, noise, ObjectiveConfig(k=4))[0])
    smoothadv = get_objective("smoothadv")(model, x, y, noise, ObjectiveConfig(k=4))[0]
    assert torch.equal(gauss, smoothadv)


def test_adversarial_methods_attack_before_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    clean = get_objective("gaussian")(model, x, y, noise, CONFIGS["gaussian"])[0]
    assert get_objective("smoothadv")(model, x, y, noise, CONFIGS["smoothadv"])[0] > clean


@pytest.mark.parametrize(("name", "base"), [("smoothadv", "gaussian"), ("adreadv", "adre")])
def test_adversarial_methods_are_their_base_at_the_attack_point(name, base):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = CONFIGS[name]
    lam = cfg.lam if name == "adreadv" else 0.0
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps, lam=lam)
    loss, terms = get_objective(name)(model, x, y, noise, cfg)
    ref_loss, ref_terms = get_objective(base)(model, x_adv, y, noise, cfg)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(terms[key], ref_terms[key]) for key in terms)


@pytest.mark.parametrize("name", ["adre", "adreadv"])
def test_adre_methods_honour_single_draw(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = CONFIGS[name]
    full = get_objective(name)(model, x, y, noise, cfg)[1]
    single = get_objective(name)(model, x, y, noise, replace(cfg, single_draw=True))[1]
    assert torch.equal(single["l_adre"], full["l_adre"])
    assert not torch.equal(single["l_per"], full["l_per"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sgd_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y, noise = synthetic()
    method, cfg = get_objective(name), CONFIGS[name]
    losses = []
    for _ in range(10):
        loss, _ = method(model, x, y, noise, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_method_rejects_noise_of_the_wrong_shape():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic(k=4)
    with pytest.raises(ValueError, match="noise"):
        get_objective("gaussian")(model, x, y, noise, ObjectiveConfig(k=2))


class Rows(nn.Module):
    """A linear model whose output keeps `fraction` of its rows (a copy of each for 2)."""

    def __init__(self, fraction: float):
        super().__init__()
        self.linear = nn.Sequential(nn.Flatten(), nn.Linear(D, 10))
        self.fraction = fraction

    def forward(self, x):
        logits = self.linear(x)
        return torch.cat([logits, logits]) if self.fraction == 2 else logits[::2]


@pytest.mark.parametrize("fraction", [2, 0.5])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_model_returning_another_number_of_rows_is_refused(name, fraction):
    """B*k rows of 10 logits regroup as [B, k, 20] (or [B, k, 5]): refused, not trained on."""
    torch.manual_seed(0)
    x, y, noise = synthetic(b=6, k=4)
    rows = int(24 * fraction)
    message = (rf"^the base classifier returned logits of shape \({rows}, 10\) for a batch of "
               r"24 inputs; expected \(24, num_classes\)")
    with pytest.raises(ValueError, match=message):
        get_objective(name)(Rows(fraction), x, y, noise, CONFIGS[name])
    with pytest.raises(ValueError, match=message):
        smooth_pgd_l2(Rows(fraction), x, y, noise, 0.5, 1)


# --- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lam": -0.1}, "lam"),
        ({"lam": math.inf}, "lam"),
        ({"k": 0}, "k"),
        ({"eps": -1.0}, "eps"),
        ({"steps": 0}, "steps"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"label_smoothing": -0.1}, "label_smoothing"),
        ({"sigma": 0.0}, "sigma"),
        ({"macer_lam": -1.0}, "macer_lam"),
        ({"macer_lam": math.inf}, "macer_lam"),
        ({"macer_beta": 0.0}, "macer_beta"),
        ({"macer_gamma": -8.0}, "macer_gamma"),
        ({"macer_gamma": math.nan}, "macer_gamma"),
        ({"consistency_lam": -0.5}, "consistency_lam"),
        ({"consistency_eta": math.nan}, "consistency_eta"),
        ({"smoothmix_eta": -5.0}, "smoothmix_eta"),
        ({"smoothmix_step": 0.0}, "smoothmix_step"),
        ({"smoothmix_mix_step": -1}, "smoothmix_mix_step"),
        ({"smoothmix_mix_step": 2, "steps": 2}, r"smoothmix_mix_step must be .* \[0, 2\)"),
        ({"warmup": 0.0}, "warmup"),
        ({"warmup": 1.5}, "warmup"),
    ],
)
def test_method_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ObjectiveConfig(**kwargs)


def test_adre_loss_validation():
    logits, y = random_problem(4, 2, 3)
    with pytest.raises(ValueError, match="lam"):
        adre_loss(logits, y, -1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        adre_loss(logits, y, 0.1, label_smoothing=1.5)
    with pytest.raises(ValueError, match="logits"):
        adre_loss(logits[:, 0], y, 0.1)
    with pytest.raises(ValueError, match="logits"):
        adre_loss(logits[..., :1], y, 0.1)
    with pytest.raises(ValueError, match="y"):
        adre_loss(logits, y[:3], 0.1)


def test_adre_floor_bounds_the_regulariser_and_stops_its_gradient():
    # A saturated runner-up: log G_runner-up is about -1000, far below log(1e-6).
    logits = torch.tensor([[[0.0, 1000.0, 0.0]]], requires_grad=True)
    y = torch.tensor([1])
    _, unbounded = adre_loss(logits, y, lam=0.5, floor=0.0)
    loss, floored = adre_loss(logits, y, lam=0.5, floor=1e-6)
    assert unbounded["l_adre"] > 900
    assert floored["l_adre"] == pytest.approx(-math.log(1e-6))
    (grad,) = torch.autograd.grad(loss, logits)
    ce_only = torch.autograd.grad(adre_loss(logits, y, lam=0.0)[0], logits)[0]
    assert torch.equal(grad, ce_only)  # below the floor only l_per pushes


def test_adre_floor_leaves_unsaturated_losses_unchanged_and_is_validated():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 3, 5), torch.randint(0, 5, (6,))
    assert torch.equal(adre_loss(logits, y, 0.3, floor=1e-6)[0], adre_loss(logits, y, 0.3)[0])
    with pytest.raises(ValueError, match="floor"):
        adre_loss(logits, y, 0.3, floor=1.0)
    with pytest.raises(ValueError, match="adre_floor"):
        ObjectiveConfig(adre_floor=-1.0)


# --- the baselines: MACER, Consistency, SmoothMix ------------------------------------------
# References below are loops over examples i and draws j on Python floats (math, scipy's
# norm.ppf for Φ⁻¹), written from the papers' equations independently of objectives.py.


def softmax_list(row, scale=1.0):
    exps = [math.exp(scale * float(v) - max(scale * float(u) for u in row)) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def mean_probs(logits_i, scale=1.0):
    k = len(logits_i)
    probs = [softmax_list(logits_i[j], scale) for j in range(k)]
    return [sum(p[c] for p in probs) / k for c in range(len(probs[0]))], probs


def per_example(logits, y):
    """(i, y_i, mean softmax, per-draw softmaxes, mean CE over the draws) of each example."""
    for i, row in enumerate(logits):
        mean, probs = mean_probs(row)
        yield i, int(y[i]), mean, probs, sum(-math.log(p[int(y[i])]) for p in probs) / len(probs)


def reference_macer(logits, y, sigma, lam, beta, gamma):
    """(loss, l_C, l_R, kinds): kinds[i] is 'hinge', 'beyond' (correct, ξ >= γ) or 'wrong'."""
    b = len(logits)
    l_c = l_r = 0.0
    kinds = []
    for i in range(b):
        yi = int(y[i])
        g, _ = mean_probs(logits[i])
        l_c += -math.log(g[yi])
        g_beta, _ = mean_probs(logits[i], beta)
        if max(range(len(g_beta)), key=lambda c: g_beta[c]) != yi:
            kinds.append("wrong")
            continue
        second = max((c for c in range(len(g_beta)) if c != yi), key=lambda c: g_beta[c])
        xi = norm.ppf(g_beta[yi]) - norm.ppf(g_beta[second])
        if xi < gamma:
            l_r += sigma / 2 * (gamma - xi)
            kinds.append("hinge")
        else:
            kinds.append("beyond")
    return (l_c + lam * l_r) / b, l_c / b, l_r / b, kinds


def macer_problem(b, k, c, seed, scale, boost=0.0):
    """Random logits; for 2 examples in 3 the label is the top class of the mean logits, and
    for 1 in 3 its logit is raised by `boost` in every draw (a confident example)."""
    logits, y = random_problem(b, k, c, seed=seed, scale=scale)
    rows = torch.arange(b)
    y[rows % 3 != 0] = logits.mean(dim=1).argmax(dim=1)[rows % 3 != 0]
    logits[rows[rows % 3 == 1], :, y[rows % 3 == 1]] += boost
    return logits, y


MACER_CASES = [  # (k, beta, gamma, scale): each case holds hinge, beyond and wrong examples
    (1, 1.0, 2.0, 3.0),
    (4, 2.0, 3.0, 2.0),
    (8, 16.0, 8.0, 0.3),
]


@pytest.mark.parametrize(("k", "beta", "gamma", "scale"), MACER_CASES)
@pytest.mark.parametrize("lam", [0.0, 12.0])
def test_macer_loss_matches_loop(k, beta, gamma, scale, lam):
    logits, y = macer_problem(24, k, 5, seed=3, scale=scale, boost=15 / beta)
    loss, terms = macer_loss(logits, y, 0.5, lam, beta, gamma)
    ref, ref_c, ref_r, kinds = reference_macer(logits.tolist(), y.tolist(), 0.5, lam, beta, gamma)
    assert {"hinge", "beyond", "wrong"} <= set(kinds)
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert terms["l_per"].item() == pytest.approx(ref_c, rel=1e-9)
    assert terms["l_macer"].item() == pytest.approx(ref_r, rel=1e-9)
    assert ref_r > 0


def test_macer_with_lam_zero_and_one_draw_is_gaussian_augmentation():
    # Zhai et al.: l_C is the CE of the soft smoothed classifier; with k = 1 that is Cohen's loss.
    logits, y = random_problem(16, 1, 10, dtype=torch.float32)
    logits.requires_grad_(True)
    loss, _ = macer_loss(logits, y, 0.25, 0.0, 16.0, 8.0)
    cohen = F.cross_entropy(logits[:, 0], y)
    torch.testing.assert_close(loss, cohen)
    torch.testing.assert_close(
        torch.autograd.grad(loss, logits)[0], torch.autograd.grad(cohen, logits)[0]
    )


def test_macer_hinge_moves_only_the_gradient_of_its_examples():
    logits, y = macer_problem(24, 4, 5, seed=3, scale=2.0, boost=7.5)
    logits.requires_grad_(True)
    _, _, _, kinds = reference_macer(logits.tolist(), y.tolist(), 0.5, 1.0, 2.0, 3.0)
    with_hinge = torch.autograd.grad(macer_loss(logits, y, 0.5, 1.0, 2.0, 3.0)[0], logits)[0]
    without = torch.autograd.grad(macer_loss(logits, y, 0.5, 0.0, 2.0, 3.0)[0], logits)[0]
    for i, kind in enumerate(kinds):
        same = torch.equal(with_hinge[i], without[i])
        assert same == (kind != "hinge"), (i, kind)


def test_macer_gradient_is_the_gradient_of_the_loss():
    logits, y = macer_problem(6, 3, 4, seed=5, scale=1.0)
    _, _, _, kinds = reference_macer(logits.tolist(), y.tolist(), 0.5, 3.0, 2.0, 3.0)
    assert "hinge" in kinds
    assert torch.autograd.gradcheck(
        lambda z: macer_loss(z, y, 0.5, 3.0, 2.0, 3.0)[0], (logits.requires_grad_(True),)
    )


def test_macer_is_finite_on_saturated_logits():
    # Φ⁻¹(1) = ∞: such examples are outside the hinge, and no NaN leaks into the gradient.
    g = torch.Generator().manual_seed(0)
    logits = (1e4 * torch.sign(torch.randn(8, 4, 10, generator=g))).requires_grad_(True)
    y = logits.detach()[:, 0].argmax(dim=1)
    y[::2] = torch.randint(10, (4,), generator=g)
    loss, terms = macer_loss(logits, y, 0.25, 12.0, 16.0, 8.0)
    (grad,) = torch.autograd.grad(loss, logits)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert torch.isfinite(terms["l_macer"])


def reference_consistency(logits, y, lam, eta, adre_lam=0.0, floor=0.0):
    total = 0.0
    for _, yi, mean, probs, ce in per_example(logits, y):
        k, c = len(probs), len(mean)
        kl = sum(sum(mean[t] * math.log(mean[t] / p[t]) for t in range(c)) for p in probs) / k
        ent = -sum(m * math.log(m) for m in mean)
        runner = max(mean[t] for t in range(c) if t != yi)
        total += ce + lam * kl + eta * ent - adre_lam * -math.log(max(runner, floor))
    return total / len(logits)


@pytest.mark.parametrize(("k", "lam", "eta", "adre_lam"),
                         [(2, 10.0, 0.5, 0.0), (4, 1.0, 0.0, 0.0), (3, 5.0, 2.0, 0.3),
                          (1, 10.0, 0.5, 0.0)])
def test_consistency_loss_matches_loop(k, lam, eta, adre_lam):
    logits, y = random_problem(7, k, 6, seed=1, scale=2.0)
    loss, terms = consistency_loss(logits, y, lam, eta, adre_lam=adre_lam, adre_floor=1e-6)
    ref = reference_consistency(logits.tolist(), y.tolist(), lam, eta, adre_lam, 1e-6)
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    # The logged terms recombine into the loss.
    recombined = terms["l_per"] + lam * terms["l_kl"] + eta * terms["l_ent"]
    assert (recombined - adre_lam * terms["l_adre"]).item() == pytest.approx(ref, rel=1e-9)


def test_consistency_with_zero_weights_is_gaussian_augmentation_exactly():
    logits, y = random_problem(16, 2, 10, dtype=torch.float32)
    logits.requires_grad_(True)
    loss, _ = consistency_loss(logits, y, 0.0, 0.0)
    gaussian = gaussian_ce(logits, y)
    assert torch.equal(loss, gaussian)
    assert torch.equal(torch.autograd.grad(loss, logits)[0],
                       torch.autograd.grad(gaussian, logits)[0])


def test_consistency_gradient_runs_through_the_mean_prediction():
    # No stop-gradient on F̂: autograd must agree with finite differences of the whole loss.
    logits, y = random_problem(4, 3, 4, seed=2, scale=1.0)
    assert torch.autograd.gradcheck(
        lambda z: consistency_loss(z, y, 3.0, 0.7, adre_lam=0.2)[0],
        (logits.requires_grad_(True),),
    )


def test_consistency_adds_adre_only_when_lam_is_positive():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    plain, terms = get_objective("consistency")(model, x, y, noise, CONFIGS["consistency"])
    with_adre, _ = get_objective("consistency")(
        model, x, y, noise, replace(CONFIGS["consistency"], lam=0.3)
    )
    torch.testing.assert_close(with_adre, plain - 0.3 * terms["l_adre"])


def reference_smoothmix(logits, logits_mix, y, mix, eta):
    total = 0.0
    for i, yi, mean, probs, ce in per_example(logits, y):
        k, c = len(probs), len(mean)
        target = [(1 - mix[i]) * mean[t] + mix[i] / c for t in range(c)]
        correct = max(range(c), key=lambda t: mean[t]) == yi
        kl = 0.0
        for j in range(k):
            q = softmax_list(logits_mix[i][j])
            kl += sum(target[t] * math.log(target[t] / q[t]) for t in range(c)) / k
        total += ce + eta * kl * correct
    return total / len(logits)


@pytest.mark.parametrize(("k", "eta"), [(1, 1.0), (2, 5.0), (4, 0.5)])
def test_smoothmix_loss_matches_loop(k, eta):
    logits, y = random_problem(9, k, 5, seed=4, scale=2.0)
    logits_mix, _ = random_problem(9, k, 5, seed=5, scale=2.0)
    mix = torch.rand(9, generator=torch.Generator().manual_seed(6), dtype=torch.float64) / 2
    loss, terms = smoothmix_loss(logits, logits_mix, y, mix, eta)
    ref = reference_smoothmix(logits.tolist(), logits_mix.tolist(), y.tolist(), mix.tolist(), eta)
    assert loss.item() == pytest.approx(ref, rel=1e-9)
    assert (terms["l_per"] + eta * terms["l_mix"]).item() == pytest.approx(ref, rel=1e-9)


def test_smoothmix_with_eta_zero_is_gaussian_augmentation():
    logits, y = random_problem(16, 2, 10, dtype=torch.float32)
    logits.requires_grad_(True)
    loss, _ = smoothmix_loss(logits, torch.randn(16, 2, 10), y, torch.full((16,), 0.3), 0.0)
    assert torch.equal(loss, gaussian_ce(logits, y))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = replace(CONFIGS["smoothmix"], smoothmix_eta=0.0)
    torch.testing.assert_close(
        get_objective("smoothmix")(model, x, y, noise, cfg)[0],
        get_objective("gaussian")(model, x, y, noise, cfg)[0],
    )


def test_smoothmix_mixup_gradient_only_on_correct_examples_and_through_the_target():
    logits, y = random_problem(12, 3, 4, seed=7, scale=2.0)
    logits_mix, _ = random_problem(12, 3, 4, seed=8, scale=2.0)
    mix = torch.full((12,), 0.25, dtype=torch.float64)
    correct = smoothed_log_probs(logits).argmax(dim=1) == y
    assert correct.any() and not correct.all()
    logits.requires_grad_(True)
    logits_mix.requires_grad_(True)
    _, terms = smoothmix_loss(logits, logits_mix, y, mix, 1.0)
    l_mix = smoothmix_loss(logits, logits_mix, y, mix, 1.0)[0] - gaussian_ce(logits, y)
    grad_clean, grad_mix = torch.autograd.grad(l_mix, (logits, logits_mix))
    for i in range(12):
        assert bool(grad_mix[i].abs().sum() > 0) == bool(correct[i])
        assert bool(grad_clean[i].abs().sum() > 0) == bool(correct[i])  # the target's F̂(x)
    assert torch.autograd.gradcheck(
        lambda a, b: smoothmix_loss(a, b, y, mix, 2.0)[0], (logits, logits_mix)
    )


def test_smoothmix_trains_on_the_mixup_of_x_and_its_unbounded_adversary():
    # The method equals smoothmix_loss at an independently built x_mix: the adversary is a
    # constant (no gradient through the attack), T steps of length alpha, mix ~ U[0, 1/2].
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = replace(CONFIGS["smoothmix"], steps=3, smoothmix_step=0.4)
    torch.manual_seed(11)
    loss, terms = get_objective("smoothmix")(model, x, y, noise, cfg)
    params = list(model.parameters())
    grads = torch.autograd.grad(loss, params)

    x_adv = smooth_pgd_l2(model, x, y, noise, eps=1e6, steps=3, step_size=0.4)
    assert ((x_adv - x).flatten(1).norm(dim=1) > 0.4 * 2.5).any()  # beyond 2 steps: unbounded
    torch.manual_seed(11)
    mix = torch.rand(len(x)) / 2
    assert mix.max() <= 0.5
    x_mix = (x + mix.view(-1, 1, 1, 1) * (x_adv - x)).detach()
    logits = model((x.unsqueeze(1) + noise).flatten(0, 1)).view(len(x), 4, -1)
    logits_mix = model((x_mix.unsqueeze(1) + noise).flatten(0, 1)).view(len(x), 4, -1)
    ref, ref_terms = smoothmix_loss(logits, logits_mix, y, mix, cfg.smoothmix_eta)
    torch.testing.assert_close(loss, ref)
    for grad, ref_grad in zip(grads, torch.autograd.grad(ref, params), strict=True):
        torch.testing.assert_close(grad, ref_grad)


def test_smoothmix_one_step_adversary_and_warmup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = replace(CONFIGS["smoothmix"], steps=3, smoothmix_step=0.4, smoothmix_mix_step=1,
                  warmup=0.5)
    torch.manual_seed(11)
    loss, _ = get_objective("smoothmix")(model, x, y, noise, cfg)
    # The clean end: one step, kept within warmup * 1 * alpha = 0.2 of x; eta halved.
    x_one = smooth_pgd_l2(model, x, y, noise, eps=0.2, steps=1, step_size=0.4)
    assert (x_one - x).flatten(1).norm(dim=1).max() <= 0.2 + 1e-6
    x_adv = smooth_pgd_l2(model, x, y, noise, eps=1e6, steps=3, step_size=0.4)
    torch.manual_seed(11)
    mix = torch.rand(len(x)) / 2
    x_mix = x_one + mix.view(-1, 1, 1, 1) * (x_adv - x_one)
    logits = model((x_one.unsqueeze(1) + noise).flatten(0, 1)).view(len(x), 4, -1)
    logits_mix = model((x_mix.unsqueeze(1) + noise).flatten(0, 1)).view(len(x), 4, -1)
    ref, _ = smoothmix_loss(logits, logits_mix, y, mix, 0.5 * cfg.smoothmix_eta)
    torch.testing.assert_close(loss, ref)


def test_baseline_losses_reject_bad_arguments():
    logits, y = random_problem(4, 2, 3)
    with pytest.raises(ValueError, match="macer_beta"):
        macer_loss(logits, y, 0.25, 1.0, 0.0, 8.0)
    with pytest.raises(ValueError, match="sigma"):
        macer_loss(logits, y, -0.25, 1.0, 16.0, 8.0)
    with pytest.raises(ValueError, match="consistency_eta"):
        consistency_loss(logits, y, 1.0, -0.5)
    with pytest.raises(ValueError, match="logits_mix"):
        smoothmix_loss(logits, logits[:, :1], y, torch.zeros(4), 1.0)
    with pytest.raises(ValueError, match="mix"):
        smoothmix_loss(logits, logits, y, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="smoothmix_eta"):
        smoothmix_loss(logits, logits, y, torch.zeros(4), math.inf)
    with pytest.raises(ValueError, match="logits"):
        macer_loss(logits[:, 0], y, 0.25, 1.0, 16.0, 8.0)


# --- presets and the command line -----------------------------------------------------------


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("cifar10-resnet110-macer", dict(objective="macer", epochs=440, batch=64, lr=0.01,
                                         lr_step=200, weight_decay=5e-4, k=16, macer_lam=12.0,
                                         macer_beta=16.0, macer_gamma=8.0)),
        ("cifar10-resnet110-consistency", dict(objective="consistency", epochs=150, batch=128,
                                               lr=0.1, lr_step=50, k=2, consistency_lam=10.0,
                                               consistency_eta=0.5)),
        ("cifar10-resnet110-smoothmix", dict(objective="smoothmix", epochs=150, batch=128, lr=0.1,
                                             lr_step=50, k=2, steps=4, smoothmix_step=1.0,
                                             smoothmix_eta=5.0, eps_warmup=10)),
    ],
)
def test_baseline_presets_are_the_papers_recipes(preset, expected):
    cfg = resolve_config(preset, sigma=0.5)
    assert (cfg.dataset, cfg.model, cfg.schedule, cfg.lr_gamma) == (
        "cifar10", "cifar_resnet110", "step", 0.1)
    assert {key: getattr(cfg, key) for key in expected} == expected
    key = {"macer": "macer_lam", "consistency": "consistency_lam",
           "smoothmix": "smoothmix_step"}[expected["objective"]]
    assert getattr(resolve_config(preset, **{key: 3.0}), key) == 3.0  # per-sigma values


def test_method_config_of_an_epoch_warms_smoothmix_up():
    cfg = resolve_config("mnist-lenet", objective="smoothmix", eps_warmup=4, smoothmix_eta=3.0,
                         sigma=0.5, smoothmix_step=0.7)
    assert [cfg.objective_config(e).warmup for e in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert cfg.objective_config().warmup == 1.0
    whole = cfg.objective_config(0)
    assert (whole.smoothmix_eta, whole.sigma, whole.smoothmix_step) == (3.0, 0.5, 0.7)


def test_baseline_options_are_refused_for_a_method_that_ignores_them():
    with pytest.raises(ValueError, match="macer_gamma is read by objective macer only"):
        resolve_config("mnist-lenet", objective="smoothmix", macer_gamma=6.0)
    with pytest.raises(ValueError, match="steps is read by objective smoothadv, adreadv and "):
        resolve_config("mnist-lenet", objective="consistency", steps=2)
    assert resolve_config("mnist-lenet", objective="consistency", lam=0.2).lam == 0.2


def test_macer_robustness_term_can_be_deferred():
    cfg = resolve_config("mnist-lenet", objective="macer", macer_lam=16.0, macer_defer=3)
    assert [cfg.objective_config(e).macer_lam for e in range(5)] == [0.0, 0.0, 0.0, 16.0, 16.0]
    assert cfg.objective_config().macer_lam == 16.0
    with pytest.raises(ValueError, match="macer_defer must be an integer >= 0"):
        resolve_config("mnist-lenet", objective="macer", macer_defer=-1)


SMALL = ["--epochs", "1", "--train-subset", "64", "--batch", "32", "--eval-subset", "0",
         "--device", "cpu", "--sigma", "0.5"]


@pytest.mark.parametrize(
    ("method", "options", "term"),
    [
        ("macer", ["--k", "4", "--macer-lam", "16", "--macer-beta", "16", "--macer-gamma", "8"],
         "l_macer"),
        ("consistency", ["--k", "2", "--consistency-lam", "5", "--consistency-eta", "0.5",
                         "--lam", "0.2"], "l_kl"),
        ("smoothmix", ["--k", "2", "--steps", "2", "--smoothmix-step", "1.0",
                       "--smoothmix-eta", "5", "--smoothmix-mix-step", "1"], "l_mix"),
    ],
)
def test_each_baseline_trains_one_epoch_from_the_command_line(tmp_path, method, options, term):
    out = tmp_path / method
    assert cli_main(["--no-progress", "train", "--preset", "mnist-lenet", "--objective", method,
                     *options, *SMALL, "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["objective"] == method
    (record,) = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert record["batches"] == 2
    for key in ("loss", "l_per", term, "train_acc"):
        assert math.isfinite(record[key]), key


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--objective", "macer", "--macer-beta", "0"], "macer_beta must be a finite number > 0"),
        (["--objective", "macer", "--macer-lam", "-12"], "macer_lam must be a finite number >= 0"),
        (["--objective", "consistency", "--consistency-eta", "-1"], "consistency_eta must be"),
        (["--objective", "smoothmix", "--smoothmix-step", "0"], "smoothmix_step must be"),
        (["--objective", "smoothmix", "--steps", "2", "--smoothmix-mix-step", "2"],
         "smoothmix_mix_step must be an integer in [0, steps) = [0, 2)"),
    ],
)
def test_bad_baseline_options_exit_2_naming_the_option(capsys, tmp_path, args, message):
    out = tmp_path / "run"
    assert cli_main(["--no-progress", "train", "--out", str(out), *args]) == 2
    stderr = capsys.readouterr().err
    assert message in stderr and "Traceback" not in stderr
    assert not out.exists()


TORCHRUN_TRAIN = ["--preset", "mnist-lenet", "--train-subset", "256", "--batch", "64", "--k",
                  "2", "--epochs", "1", "--eval-subset", "0", "--device", "cpu"]


def torchrun_train(args: list[str], cwd: Path) -> None:
    """`smoothcert train *args` on 2 processes (gloo), importing this checkout's smoothcert."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(Path(smoothcert.__file__).parents[1]))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone", "-m", "smoothcert", "--no-progress", "train", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["macer", "consistency", "smoothmix"])
def test_each_baseline_trains_under_torchrun(tmp_path, method):
    # SmoothMix: each rank draws its own mixing weights, so only the run itself is checked.
    extra = ["--steps", "2"] if method == "smoothmix" else []
    torchrun_train([*TORCHRUN_TRAIN, "--objective", method, *extra, "--out", "two"], tmp_path)
    (record,) = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text()
                 .splitlines()]
    assert record["batches"] == 256 // 64 and math.isfinite(record["loss"])
    if method == "smoothmix":
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["--no-progress", "train", *TORCHRUN_TRAIN, "--objective", method,
                         "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    one = read_checkpoint_state(tmp_path / "one" / "checkpoint.pt")["model"]
    two = read_checkpoint_state(tmp_path / "two" / "checkpoint.pt")["model"]
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=0, atol=1e-5, msg=name)
