"""L2 PGD on the soft smoothed classifier (SmoothAdv, Salman et al. 2019; ADREADV, Feng et al.)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .smooth import check_logits


def noisy_logits(model: nn.Module, x: Tensor, noise: Tensor) -> Tensor:
    """Logits [B, k, C] of `model` on every x_i + noise_ij, in one forward pass of B*k inputs
    (refused unless the model returns one row per input: rows would be regrouped silently)."""
    b, k = noise.shape[:2]
    return check_logits(model((x.unsqueeze(1) + noise).flatten(0, 1)), b * k).reshape(b, k, -1)


def smoothed_log_probs(logits: Tensor) -> Tensor:
    """log Ĝ [B, C] with Ĝ = mean over the k draws of softmax(logits [B, k, C])."""
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, k, C], got {tuple(logits.shape)}")
    # At least float32: under autocast the logits may be half precision.
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return torch.logsumexp(F.log_softmax(logits, dim=-1), dim=1) - math.log(logits.shape[1])


def runner_up(log_g: Tensor, y: Tensor) -> Tensor:
    """argmax over c != y_i of log_g [B, C], per example."""
    if log_g.dim() != 2 or log_g.shape[1] < 2:
        raise ValueError(f"log_g must have shape [B, C] with C >= 2, got {tuple(log_g.shape)}")
    if y.shape != log_g.shape[:1]:
        raise ValueError(f"y must have shape [{log_g.shape[0]}], got {tuple(y.shape)}")
    # Clamping keeps every c != y strictly above the masked true class, even where log_g = -inf.
    scores = log_g.detach().clamp_min(torch.finfo(log_g.dtype).min)
    return scores.scatter(1, y.unsqueeze(1), -math.inf).argmax(dim=1)


def _check_pgd_args(
    x: Tensor, y: Tensor, noise: Tensor, eps: float, steps: int, lam: float,
    step_size: float | None,
) -> None:
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be a finite number > 0 (or None), got {step_size}")
    if steps < 0 or (eps > 0 and steps < 1):
        raise ValueError(
            f"steps must be an integer >= 1 when eps > 0 (>= 0 otherwise), got {steps}"
        )
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam}")
    if y.shape != x.shape[:1]:
        raise ValueError(f"y must have shape [{x.shape[0]}], got {tuple(y.shape)}")
    if (
        noise.dim() != x.dim() + 1
        or noise.shape[0] != x.shape[0]
        or noise.shape[1] < 1
        or noise.shape[2:] != x.shape[1:]
    ):
        raise ValueError(
            f"noise must have shape [B, k, *x.shape[1:]] = [{x.shape[0]}, k >= 1, "
            f"{', '.join(map(str, x.shape[1:]))}], got {tuple(noise.shape)}"
        )


def _attack_loss(log_g: Tensor, y: Tensor, lam: float) -> Tensor:
    """Summed CE(Ĝ, y) − lam·CE(Ĝ, runner-up): summed so each example's gradient is its own."""
    loss = F.nll_loss(log_g, y, reduction="sum")
    if lam > 0:
        loss = loss - lam * F.nll_loss(log_g, runner_up(log_g, y), reduction="sum")
    return loss


def smooth_pgd_l2(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    noise: Tensor,
    eps: float,
    steps: int,
    lam: float = 0.0,
    step_size: float | None = None,
) -> Tensor:
    """Adversarial x' with ‖x'−x‖₂ ≤ eps in [0,1], by `steps` L2 PGD steps on the soft smoothed
    classifier with the fixed `noise` [B, k, *x.shape[1:]] (already scaled by sigma).

    Maximises CE(Ĝ(x'), y) − lam·CE(Ĝ(x'), argmax_{c≠y} Ĝ(x')); lam = 0 is SmoothAdv.
    Each step has length `step_size` (default 2·eps/steps, SmoothAdv's); eps = steps·step_size
    is a ball the steps cannot leave, i.e. no norm bound (SmoothMix's attack).
    The model runs in eval mode with parameter gradients off; both are restored afterwards.
    """
    _check_pgd_args(x, y, noise, eps, steps, lam, step_size)
    if eps == 0 or steps == 0:
        return x.detach().clone()
    if isinstance(model, DistributedDataParallel):
        # The attack needs no gradient all-reduce; a forward through DDP would expect one.
        model = model.module

    was_training = model.training
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    x = x.detach()
    step_size = 2 * eps / steps if step_size is None else step_size
    per_example = (-1,) + (1,) * (x.dim() - 1)
    try:
        model.eval()
        for p in params:
            p.requires_grad_(False)
        x_adv = x.clone()
        with torch.enable_grad():
            for _ in range(steps):
                x_adv.requires_grad_(True)
                loss = _attack_loss(smoothed_log_probs(noisy_logits(model, x_adv, noise)), y, lam)
                (grad,) = torch.autograd.grad(loss, x_adv)
                norm = grad.flatten(1).norm(dim=1)
                norm = torch.where(norm > 0, norm, torch.ones_like(norm))
                delta = x_adv.detach() + step_size * grad / norm.view(per_example) - x
                # Project onto the eps-ball, then clamp: clamping to [0,1] never moves a point
                # further from an x inside [0,1], so the result stays in the ball.
                scale = (eps / delta.flatten(1).norm(dim=1).clamp_min(1e-12)).clamp(max=1.0)
                x_adv = (x + delta * scale.view(per_example)).clamp(0.0, 1.0)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return x_adv.detach()
