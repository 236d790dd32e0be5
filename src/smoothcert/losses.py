"""The training losses on logits [B, k, C] (k noisy draws per example): Gaussian augmentation's
cross-entropy, ADREREG, and the baselines MACER, Consistency and SmoothMix, with the range
checks of their settings. `objectives` turns each into a registered training objective.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from smoothcert.attacks import runner_up, smoothed_log_probs


def check_lam(lam: float, name: str = "lam") -> None:
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {lam}")


def check_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_label_smoothing(label_smoothing: float) -> None:
    if not 0 <= label_smoothing < 1:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")


def _check_logits(logits: Tensor, y: Tensor) -> None:
    if logits.dim() != 3 or logits.shape[1] < 1 or logits.shape[2] < 2:
        raise ValueError(
            f"logits must have shape [B, k, C] with k >= 1, C >= 2, got {tuple(logits.shape)}"
        )
    if y.shape != logits.shape[:1]:
        raise ValueError(f"y must have shape [{logits.shape[0]}], got {tuple(y.shape)}")


def _at_least_float32(logits: Tensor) -> Tensor:
    # Under autocast the logits may be half precision; probabilities are taken in float32.
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def gaussian_ce(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Mean cross-entropy over every example and draw of logits [B, k, C] (Gaussian
    augmentation, Cohen et al. 2019; with k > 1 the mean over the draws, Salman et al. 2019)."""
    return F.cross_entropy(
        logits.flatten(0, 1), y.repeat_interleave(logits.shape[1]), label_smoothing=label_smoothing
    )


def adre_loss(
    logits: Tensor,
    y: Tensor,
    lam: float,
    single_draw: bool = False,
    generator: torch.Generator | None = None,
    label_smoothing: float = 0.0,
    floor: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ADREREG loss mean_i(l_per − lam·l_adre) of logits [B, k, C] (paper Algorithm 1).

    l_per is the CE averaged over the k draws, or, with `single_draw`, the CE of one draw per
    example picked uniformly with `generator`; l_adre = −log max(Ĝ_ŷ, floor) with ŷ the
    runner-up of the averaged softmax Ĝ. Returns the loss and the detached batch means of
    l_per and l_adre.

    With floor = 0 the regulariser is unbounded below and its gradient never vanishes, so a
    network can lower the loss forever by inflating its logits (LeNet on MNIST diverged this
    way); a floor > 0 stops the push once the runner-up is below it, as the probability-space
    form log(Ĝ + eps) of common implementations does.
    """
    if not (math.isfinite(floor) and 0 <= floor < 1):
        raise ValueError(f"floor must be in [0, 1), got {floor}")
    _check_logits(logits, y)
    check_lam(lam)
    check_label_smoothing(label_smoothing)
    b, k, _ = logits.shape

    if single_draw:
        device = logits.device if generator is None else generator.device
        j = torch.randint(k, (b,), generator=generator, device=device).to(logits.device)
        l_per = F.cross_entropy(
            logits[torch.arange(b, device=logits.device), j], y, label_smoothing=label_smoothing
        )
    else:
        # One CE over all B*k noisy inputs: with lam = 0 this is Gaussian augmentation exactly.
        l_per = gaussian_ce(logits, y, label_smoothing)
    log_g = smoothed_log_probs(logits)
    log_runner_up = log_g.gather(1, runner_up(log_g, y).unsqueeze(1))
    if floor > 0:
        log_runner_up = log_runner_up.clamp(min=math.log(floor))
    l_adre = -log_runner_up.mean()
    loss = l_per - lam * l_adre if lam > 0 else l_per
    return loss, {"l_per": l_per.detach(), "l_adre": l_adre.detach()}


def macer_loss(
    logits: Tensor, y: Tensor, sigma: float, lam: float, beta: float, gamma: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """MACER (Zhai et al. 2020, Algorithm 1) on logits [B, k, C]: l_C + lam · l_R.

    l_C = mean_i −log Ĝ_y(x_i), the cross-entropy of the soft smoothed classifier
    Ĝ = mean_j softmax(logits_j). The robustness term uses the soft smoothed classifier with
    inverse temperature beta, Ĝ^β = mean_j softmax(beta · logits_j) (Sec. 4.2): on the examples
    it classifies correctly (the set G_θ), with ξ = Φ⁻¹(Ĝ^β_y) − Φ⁻¹(Ĝ^β_ŷ) and ŷ its runner-up,
    (σ/2)·ξ is the certified radius of Cohen et al. and l_R = (1/B) Σ_{i∈G_θ} (σ/2)·max(γ − ξ_i, 0)
    (Sec. 4.1, the hinge on the radius). G_θ and ŷ are chosen without gradient; an example
    with a saturated Ĝ^β (ξ = ∞) is outside the hinge. Returns the loss and the detached l_C
    (as l_per) and l_R (as l_macer).
    """
    _check_logits(logits, y)
    check_positive(sigma, "sigma")
    check_lam(lam, "macer_lam")
    check_positive(beta, "macer_beta")
    check_positive(gamma, "macer_gamma")
    logits = _at_least_float32(logits)
    l_c = F.nll_loss(smoothed_log_probs(logits), y)
    g_beta = torch.softmax(beta * logits, dim=-1).mean(dim=1)
    second = runner_up(g_beta, y)
    with torch.no_grad():
        xi = torch.special.ndtri(g_beta.gather(1, y[:, None])) - torch.special.ndtri(
            g_beta.gather(1, second[:, None])
        )
        active = (g_beta.argmax(dim=1) == y) & (xi.squeeze(1) < gamma)
    # ξ again, with gradient, on the hinge's examples only: elsewhere Φ⁻¹ may be infinite and
    # its gradient would turn the zero of the hinge into NaN.
    rows = active.nonzero().squeeze(1)
    xi_active = torch.special.ndtri(g_beta[rows, y[rows]]) - torch.special.ndtri(
        g_beta[rows, second[rows]]
    )
    l_r = (sigma / 2) * (gamma - xi_active).sum() / logits.shape[0]
    loss = l_c + lam * l_r if lam > 0 else l_c
    return loss, {"l_per": l_c.detach(), "l_macer": l_r.detach()}


def consistency_loss(
    logits: Tensor,
    y: Tensor,
    lam: float,
    eta: float,
    adre_lam: float = 0.0,
    label_smoothing: float = 0.0,
    adre_floor: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Consistency regularisation (Jeong & Shin 2020, Sec. 3.2) on logits [B, m, C].

    mean_j CE(F(x+δ_j), y) + lam · mean_j KL(F̂(x) ‖ F(x+δ_j)) + eta · H(F̂(x)), with F the
    softmax, F̂ = mean_j F(x+δ_j) and H the entropy; no stop-gradient (the paper writes none).
    With adre_lam > 0, ADRE's −adre_lam·l_adre (runner-up of F̂, floored at adre_floor) is
    added on top. lam = eta = adre_lam = 0 is Gaussian augmentation exactly. Logs l_per,
    l_adre, l_kl and l_ent (batch means).
    """
    check_lam(lam, "consistency_lam")
    check_lam(eta, "consistency_eta")
    loss, terms = adre_loss(logits, y, adre_lam, label_smoothing=label_smoothing, floor=adre_floor)
    log_p = F.log_softmax(_at_least_float32(logits), dim=-1)
    log_mean = smoothed_log_probs(logits)
    mean = log_mean.exp()
    l_kl = (mean.unsqueeze(1) * (log_mean.unsqueeze(1) - log_p)).sum(dim=-1).mean()
    l_ent = -(mean * log_mean).sum(dim=-1).mean()
    if lam > 0 or eta > 0:
        loss = loss + lam * l_kl + eta * l_ent
    return loss, {**terms, "l_kl": l_kl.detach(), "l_ent": l_ent.detach()}


def smoothmix_loss(
    logits: Tensor,
    logits_mix: Tensor,
    y: Tensor,
    mix: Tensor,
    eta: float,
    label_smoothing: float = 0.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SmoothMix (Jeong et al. 2021, Sec. 3) on logits [B, m, C] at x + δ_j and logits_mix
    [B, m, C] at x_mix + δ_j, x_mix = (1 − mix)·x + mix·x_adv with mix [B] in [0, 1/2].

    L_nat + eta · L_mix: L_nat = mean_j CE(F(x+δ_j), y) (Gaussian augmentation); the mixup
    target ỹ = (1 − mix)·F̂(x) + mix·(1/C) moves the soft smoothed prediction F̂ = mean_j F(x+δ_j)
    towards the uniform distribution along the adversarial direction, and
    L_mix = (1/(B·m)) Σ_i 1[argmax F̂(x_i) = y_i] Σ_j KL(ỹ_i ‖ F(x_mix,i + δ_ij)), on the
    examples F̂ classifies correctly. The indicator carries no gradient; ỹ does (the paper
    writes no stop-gradient). eta = 0 is Gaussian augmentation exactly. Logs l_per (= L_nat)
    and l_mix.
    """
    _check_logits(logits, y)
    if logits_mix.shape != logits.shape:
        raise ValueError(
            f"logits_mix must have the shape of logits {tuple(logits.shape)}, "
            f"got {tuple(logits_mix.shape)}"
        )
    if mix.shape != y.shape:
        raise ValueError(f"mix must have shape [{y.shape[0]}], got {tuple(mix.shape)}")
    check_lam(eta, "smoothmix_eta")
    check_label_smoothing(label_smoothing)
    l_nat = gaussian_ce(logits, y, label_smoothing)
    log_mean = smoothed_log_probs(logits)
    correct = (log_mean.detach().argmax(dim=1) == y).float()
    mix = mix.to(log_mean.dtype).unsqueeze(1)
    target = (1 - mix) * log_mean.exp() + mix / logits.shape[2]
    log_q = F.log_softmax(_at_least_float32(logits_mix), dim=-1)
    kl = (torch.special.xlogy(target, target).unsqueeze(1) - target.unsqueeze(1) * log_q).sum(-1)
    l_mix = (correct.unsqueeze(1) * kl).mean()
    loss = l_nat + eta * l_mix if eta > 0 else l_nat
    return loss, {"l_per": l_nat.detach(), "l_mix": l_mix.detach()}


def denoiser_mse_loss(denoised: Tensor, x: Tensor) -> Tensor:
    """Salman et al.'s MSE objective on denoised [B, k, *x.shape[1:]]: the mean over the batch,
    the k draws and the pixels of (D(x + delta) - x)^2, i.e. ||D(x + delta) - x||^2 / d for images
    of d = C·H·W pixels, averaged (the reduction of torch's MSELoss)."""
    diff = _at_least_float32(denoised) - x.unsqueeze(1)
    return diff.square().mean()


def denoiser_stability_loss(
    logits: Tensor, target: Tensor, label_smoothing: float = 0.0
) -> Tensor:
    """Salman et al.'s stability objective on the classifier's logits [B, k, C] at D(x + delta):
    the mean cross-entropy against target [B], the classifier's prediction on the clean x."""
    return gaussian_ce(_at_least_float32(logits), target, label_smoothing)
