import itertools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothcert.attacks import smooth_pgd_l2, smoothed_log_probs
from smoothcert.objectives import METHODS, MethodConfig, adre_loss, get_method

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
    cfg_reg, cfg_plain = MethodConfig(lam=1.0, k=4), MethodConfig(k=4)
    loss = get_method("adre")(model, x, y, noise, cfg_reg)[0]
    loss = loss - get_method("gaussian")(model, x, y, noise, cfg_plain)[0]
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
    "gaussian": MethodConfig(k=4),
    "adre": MethodConfig(lam=0.2, k=4),
    "smoothadv": MethodConfig(k=4, eps=0.5, steps=2),
    "adreadv": MethodConfig(lam=0.2, k=4, eps=0.5, steps=2),
}


def test_registry_names():
    assert set(METHODS) == set(CONFIGS)
    for name, fn in METHODS.items():
        assert get_method(name) is fn
    with pytest.raises(ValueError, match="gaussian"):
        get_method("macer")


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_method_returns_differentiable_loss_and_terms(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    loss, terms = get_method(name)(model, x, y, noise, CONFIGS[name])
    assert loss.dim() == 0 and torch.isfinite(loss) and loss.requires_grad
    assert set(terms) == {"l_per", "l_adre", "acc"}
    assert all(not t.requires_grad and t.dim() == 0 for t in terms.values())
    assert 0 <= terms["acc"].item() <= 1
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_gaussian_method_equals_adre_with_lam_zero_and_smoothadv_with_eps_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    gauss = get_method("gaussian")(model, x, y, noise, MethodConfig(k=4))[0]
    assert torch.equal(gauss, get_method("adre")(model, x, y, noise, MethodConfig(k=4))[0])
    assert torch.equal(gauss, get_method("smoothadv")(model, x, y, noise, MethodConfig(k=4))[0])


def test_adversarial_methods_attack_before_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    clean = get_method("gaussian")(model, x, y, noise, CONFIGS["gaussian"])[0]
    assert get_method("smoothadv")(model, x, y, noise, CONFIGS["smoothadv"])[0] > clean


@pytest.mark.parametrize(("name", "base"), [("smoothadv", "gaussian"), ("adreadv", "adre")])
def test_adversarial_methods_are_their_base_at_the_attack_point(name, base):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = CONFIGS[name]
    lam = cfg.lam if name == "adreadv" else 0.0
    x_adv = smooth_pgd_l2(model, x, y, noise, cfg.eps, cfg.steps, lam=lam)
    loss, terms = get_method(name)(model, x, y, noise, cfg)
    ref_loss, ref_terms = get_method(base)(model, x_adv, y, noise, cfg)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(terms[key], ref_terms[key]) for key in terms)


@pytest.mark.parametrize("name", ["adre", "adreadv"])
def test_adre_methods_honour_single_draw(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    x, y, noise = synthetic()
    cfg = CONFIGS[name]
    full = get_method(name)(model, x, y, noise, cfg)[1]
    single = get_method(name)(model, x, y, noise, replace(cfg, single_draw=True))[1]
    assert torch.equal(single["l_adre"], full["l_adre"])
    assert not torch.equal(single["l_per"], full["l_per"])


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_sgd_steps_lower_the_loss(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 5))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y, noise = synthetic()
    method, cfg = get_method(name), CONFIGS[name]
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
        get_method("gaussian")(model, x, y, noise, MethodConfig(k=2))


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
    ],
)
def test_method_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MethodConfig(**kwargs)


def test_method_config_is_frozen():
    with pytest.raises(AttributeError):
        MethodConfig().lam = 1.0


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
        MethodConfig(adre_floor=-1.0)
