import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from smoothcert.attacks import noisy_logits, runner_up, smooth_pgd_l2, smoothed_log_probs

SHAPE = (1, 4, 4)
D = 16
C = 5


def linear_model(seed: int = 0, scale: float = 1.0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, C))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(scale)
    return model


def batch(seed: int = 0, b: int = 8, k: int = 4, sigma: float = 0.25):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, *SHAPE, generator=g)
    y = torch.randint(C, (b,), generator=g)
    noise = sigma * torch.randn(b, k, *SHAPE, generator=g)
    return x, y, noise


def smoothed_ce(model: nn.Module, x, y, noise) -> torch.Tensor:
    with torch.no_grad():
        return F.nll_loss(smoothed_log_probs(noisy_logits(model, x, noise)), y, reduction="none")


def test_smoothed_log_probs_is_log_of_mean_softmax():
    logits = torch.randn(3, 4, C, dtype=torch.float64)
    expected = torch.log(torch.softmax(logits, dim=-1).mean(dim=1))
    torch.testing.assert_close(smoothed_log_probs(logits), expected)
    torch.testing.assert_close(
        smoothed_log_probs(logits[:, :1]), torch.log_softmax(logits[:, 0], dim=-1)
    )


def test_smoothed_log_probs_computes_half_precision_logits_in_float32():
    logits = torch.randn(3, 4, C).to(torch.bfloat16)
    out = smoothed_log_probs(logits)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, smoothed_log_probs(logits.float()))


def test_runner_up_excludes_true_class():
    log_g = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]))
    y = torch.tensor([0, 1, 2])
    assert runner_up(log_g, y).tolist() == [1, 0, 0]
    # Every other class at -inf: the answer is still a class other than y.
    log_g = torch.tensor([[-math.inf, 0.0, -math.inf], [0.0, -math.inf, -math.inf]])
    ru = runner_up(log_g, torch.tensor([1, 0]))
    assert ru[0].item() != 1 and ru[1].item() != 0


@pytest.mark.parametrize("eps", [0.1, 0.5, 2.0])
def test_result_in_eps_ball_and_pixel_range(eps):
    model = linear_model(scale=5.0)
    x, y, noise = batch()
    x_adv = smooth_pgd_l2(model, x, y, noise, eps, steps=5)
    assert x_adv.shape == x.shape
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1


def test_single_step_moves_eps_along_normalised_gradient():
    model = linear_model(scale=0.1)  # small weights: the step stays clear of the [0,1] bounds
    x, y, noise = batch(sigma=0.05)
    x = 0.25 + 0.5 * x
    eps = 0.05
    x_ref = x.clone().requires_grad_(True)
    loss = F.nll_loss(smoothed_log_probs(noisy_logits(model, x_ref, noise)), y, reduction="sum")
    (grad,) = torch.autograd.grad(loss, x_ref)
    direction = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    # One step of size 2*eps, projected back onto the eps-sphere.
    torch.testing.assert_close(smooth_pgd_l2(model, x, y, noise, eps, steps=1), x + eps * direction)


def reference_pgd(model, x, y, noise, eps, steps, lam, step=None):
    """Salman et al.'s loop, written out independently (renorm for the projection); steps of
    length 2·eps/steps unless `step` is given."""
    step = 2 * eps / steps if step is None else step
    b, k = noise.shape[:2]
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        probs = torch.softmax(model((x_adv.unsqueeze(1) + noise).flatten(0, 1)), -1)
        g = probs.view(b, k, -1).mean(dim=1)
        masked = g.detach().clone()
        masked[torch.arange(b), y] = -1.0
        loss = -torch.log(g[torch.arange(b), y]).sum()
        loss = loss + lam * torch.log(g[torch.arange(b), masked.argmax(dim=1)]).sum()
        (grad,) = torch.autograd.grad(loss, x_adv)
        grad = grad / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        delta = (x_adv.detach() + step * grad - x).renorm(p=2, dim=0, maxnorm=eps)
        x_adv = (x + delta).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize(("eps", "steps", "lam", "step"),
                         [(0.3, 1, 0.0, None), (0.5, 4, 0.0, None), (1.0, 7, 0.5, None),
                          (0.5, 3, 0.0, 0.1), (1.0, 2, 0.5, 0.5)])
def test_matches_reference_loop(eps, steps, lam, step):
    model = linear_model(scale=3.0)
    x, y, noise = batch()
    x, noise = x.double(), noise.double()
    model.double()
    torch.testing.assert_close(
        smooth_pgd_l2(model, x, y, noise, eps, steps, lam, step_size=step),
        reference_pgd(model, x, y, noise, eps, steps, lam, step=step),
    )


def test_eps_of_steps_times_step_size_is_no_bound():
    # SmoothMix's attack: T steps of length alpha never leave the ball of radius T·alpha, so the
    # result is the unprojected walk (only clamped to the pixel range).
    model = linear_model(scale=3.0)
    x, y, noise = batch()
    x, noise = x.double(), noise.double()
    model.double()
    bounded = smooth_pgd_l2(model, x, y, noise, 4 * 0.3, 4, step_size=0.3)
    unbounded = reference_pgd(model, x, y, noise, 1e9, 4, 0.0, step=0.3)
    torch.testing.assert_close(bounded, unbounded)
    assert ((bounded - x).flatten(1).norm(dim=1) > 2 * 0.3).any()


def test_raises_smoothed_cross_entropy():
    model = linear_model(scale=3.0)
    x, y, noise = batch(b=16)
    x_adv = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=5)
    before = smoothed_ce(model, x, y, noise)
    after = smoothed_ce(model, x_adv, y, noise)
    assert after.mean() > before.mean() + 0.1
    assert (after >= before - 1e-6).float().mean() >= 0.9


def test_restores_flags_and_leaves_no_grad():
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, 8), nn.ReLU(), nn.Linear(8, C))
    model.train()
    model[1].bias.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    x, y, noise = batch()
    smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=3)
    assert model.training
    assert [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    model.eval()
    smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=3)
    assert not model.training


class Exploding(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(D, C)

    def forward(self, x):
        raise RuntimeError("boom")


def test_restores_flags_on_exception():
    model = Exploding().train()
    x, y, noise = batch()
    with pytest.raises(RuntimeError, match="boom"):
        smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=2)
    assert model.training
    assert all(p.requires_grad for p in model.parameters())


def test_runs_in_eval_mode_and_reuses_noise():
    # Dropout would make two attacks differ if the model were left in train mode.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(D, C)).train()
    x, y, noise = batch()
    a = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=4)
    b = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=4)
    assert torch.equal(a, b)
    _, _, other_noise = batch(seed=1)
    assert not torch.equal(a, smooth_pgd_l2(model, x, y, other_noise, eps=0.5, steps=4))


def test_lam_changes_the_attack():
    model = linear_model(scale=3.0)
    x, y, noise = batch()
    plain = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=4, lam=0.0)
    regularised = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=4, lam=1.0)
    assert (plain - regularised).abs().max() > 1e-3


def test_zero_budget_returns_copy_of_x():
    model = linear_model()
    x, y, noise = batch()
    for eps, steps in [(0.0, 5), (0.0, 0)]:
        out = smooth_pgd_l2(model, x, y, noise, eps=eps, steps=steps)
        assert torch.equal(out, x) and out is not x


def test_zero_gradient_leaves_x_in_place():
    model = linear_model(scale=0.0)  # constant output: the gradient is exactly zero
    x, y, noise = batch()
    assert torch.equal(smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=3), x)


def test_works_under_no_grad():
    model = linear_model(scale=3.0)
    x, y, noise = batch()
    with torch.no_grad():
        x_adv = smooth_pgd_l2(model, x, y, noise, eps=0.5, steps=2)
    assert not torch.equal(x_adv, x)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"eps": -0.1}, "eps"),
        ({"eps": math.nan}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": -1, "eps": 0.0}, "steps"),
        ({"lam": -1.0}, "lam"),
        ({"step_size": 0.0}, "step_size"),
        ({"step_size": math.inf}, "step_size"),
        ({"noise": torch.zeros(8, 4, 1, 4, 5)}, "noise"),
        ({"noise": torch.zeros(8, 1, 4, 4)}, "noise"),
        ({"noise": torch.zeros(7, 4, 1, 4, 4)}, "noise"),
        ({"y": torch.zeros(7, dtype=torch.long)}, "y"),
    ],
)
def test_bad_arguments(kwargs, name):
    x, y, noise = batch()
    args = {"x": x, "y": y, "noise": noise, "eps": 0.5, "steps": 2, "lam": 0.0} | kwargs
    with pytest.raises(ValueError, match=name):
        smooth_pgd_l2(linear_model(), **args)


def test_helpers_reject_bad_shapes():
    with pytest.raises(ValueError, match="logits"):
        smoothed_log_probs(torch.zeros(3, C))
    with pytest.raises(ValueError, match="log_g"):
        runner_up(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="y"):
        runner_up(torch.zeros(3, C), torch.zeros(2, dtype=torch.long))
