"""The smoothed classifier g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I).

Method names and signatures follow Cohen et al.'s `core.Smooth`, so code written against it
runs unchanged; `tcertify` and `certify_all` add the paper's T-CERTIFY. Like Cohen's, the base
classifier is sampled in eval mode (each module's own mode is given back afterwards).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from . import sequential, stats
from .perf import AMP
from .sequential import RadiiCertificate
from .stats import ABSTAIN, Certificate

AMP_DTYPES = dict(zip(AMP, (torch.bfloat16, torch.float16), strict=True))


def autocast(device: torch.device, amp: str | None):
    """Autocast to `amp` ("bf16"/"fp16") on `device`, or nothing for amp=None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@dataclass(frozen=True)
class CertifyAllResult:
    """CERTIFY, T-CERTIFY and strict T-CERTIFY from one set of samples, with the counts."""

    certify: Certificate
    tcertify: Certificate
    strict: Certificate
    selection_counts: np.ndarray
    estimation_counts: np.ndarray

    @classmethod
    def from_counts(cls, selection, estimation, sigma: float, alpha: float, grid: int):
        """All three certificates from one set of selection and estimation counts."""
        certs = {
            method: stats.certify_from_counts(selection, estimation, sigma, alpha, method, grid)
            for method in stats.METHODS
        }
        return cls(certify=certs["certify"], tcertify=certs["tcertify"],
                   strict=certs["tcertify-strict"], selection_counts=selection,
                   estimation_counts=estimation)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Run the block with every submodule of `model` in eval mode, then restore each one's mode.

    Train-mode BatchNorm would make each noisy sample depend on the rest of its batch (and
    overwrite the running statistics); dropout would sample a different network per input.
    """
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _check_input_range(input_range) -> tuple[float, float]:
    try:
        low, high = (float(value) for value in input_range)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(
            f"input_range must be None or finite (low, high) with low < high, got {input_range!r}"
        )
    return low, high


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a model with neither)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


def check_logits(logits: object, batch: int, num_classes: int | None = None) -> torch.Tensor:
    """`logits` if a base classifier's output for `batch` inputs is real logits [batch,
    num_classes] (any number of columns for None). The output is untrusted: a row too many
    would be a vote too many, and a certificate inflated with it."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(
            f"base_classifier must return a logits tensor [batch, num_classes], got "
            f"{type(logits).__name__}: wrap it in a module that returns the logits only"
        )
    if logits.dtype == torch.bool or logits.is_complex():
        raise ValueError(
            f"base_classifier must return real-valued logits, got dtype {logits.dtype}"
        )
    if logits.dim() != 2 or len(logits) != batch or logits.shape[1] != (
            num_classes or logits.shape[1]):
        raise ValueError(
            f"the base classifier returned logits of shape {tuple(logits.shape)} for a batch "
            f"of {batch} inputs; expected ({batch}, {num_classes or 'num_classes'}): one row "
            "per input, one column per class (num_classes)"
        )
    return logits


def _estimation_stream(
    generator: torch.Generator | None, estimation_generator: torch.Generator | None
) -> torch.Generator | None:
    """The estimation samples' generator: their own, or where the selection samples left off."""
    return generator if estimation_generator is None else estimation_generator


class Smooth:
    """Smoothed classifier over `base_classifier` (any nn.Module mapping [B, *shape] to logits).

    The noise is calibrated to inputs in `input_range` ([0, 1] pixels by default); inputs
    outside it are refused. Give the range a base classifier really takes, or None to accept
    any finite input. Sampling runs the base classifier in eval mode and then gives every
    submodule its previous mode back, even when sampling fails. The base classifier is
    untrusted: each of its outputs must be finite logits, one row per input and num_classes
    columns, or sampling stops with a ValueError.
    """

    ABSTAIN = ABSTAIN

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        amp: str | None = None,
        input_range: tuple[float, float] | None = (0.0, 1.0),
    ):
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.base_classifier = base_classifier
        self.num_classes = num_classes
        self.sigma = stats.check_sigma(sigma)
        self.amp = amp
        self.input_range = None if input_range is None else _check_input_range(input_range)

    def predict(
        self,
        x: torch.Tensor,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
    ) -> int:
        """Cohen's PREDICT: the top class, or ABSTAIN unless the top-two test rejects at alpha."""
        stats.check_alpha(alpha)
        counts = self._sample_noise(x, n, batch_size, generator, name="n")
        return stats.predict_from_counts(counts, alpha)

    def certify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        generator: torch.Generator | None = None,
        estimation_generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """Cohen's CERTIFY: (label, radius), or (ABSTAIN, 0.0).

        The n0 selection samples are drawn from `generator`, the n estimation samples from
        `estimation_generator` (from where `generator` left off when it is None).
        """
        cert = self._certify(x, n0, n, alpha, batch_size, (generator, estimation_generator),
                             "certify", grid=1)
        return cert.label, cert.radius

    def tcertify(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        grid: int = 10,
        strict: bool = False,
        generator: torch.Generator | None = None,
        estimation_generator: torch.Generator | None = None,
    ) -> tuple[int, float]:
        """The paper's T-CERTIFY (strict=True: alpha' chosen from the selection samples only)."""
        method = "tcertify-strict" if strict else "tcertify"
        cert = self._certify(x, n0, n, alpha, batch_size, (generator, estimation_generator),
                             method, grid)
        return cert.label, cert.radius

    def certify_all(
        self,
        x: torch.Tensor,
        n0: int,
        n: int,
        alpha: float,
        batch_size: int,
        grid: int = 10,
        generator: torch.Generator | None = None,
        estimation_generator: torch.Generator | None = None,
    ) -> CertifyAllResult:
        """CERTIFY and T-CERTIFY (paper and strict) on the same selection and estimation samples."""
        selection, estimation = self._selection_and_estimation(
            x, n0, n, alpha, batch_size, grid, (generator, estimation_generator)
        )
        certs = {
            method: stats.certify_from_counts(
                selection, estimation, self.sigma, alpha, method, grid
            )
            for method in stats.METHODS
        }
        return CertifyAllResult(
            certify=certs["certify"],
            tcertify=certs["tcertify"],
            strict=certs["tcertify-strict"],
            selection_counts=selection,
            estimation_counts=estimation,
        )

    def _certify(self, x, n0, n, alpha, batch_size, generators, method, grid) -> Certificate:
        selection, estimation = self._selection_and_estimation(
            x, n0, n, alpha, batch_size, grid, generators
        )
        return stats.certify_from_counts(selection, estimation, self.sigma, alpha, method, grid)

    def _selection_and_estimation(self, x, n0, n, alpha, batch_size, grid, generators):
        stats.check_alpha_grid(alpha, grid)
        stats.check_sample_count(n, "n")  # before the n0 selection samples are drawn
        selection_generator, estimation_generator = generators
        selection = self._sample_noise(x, n0, batch_size, selection_generator, name="n0")
        estimation = self._sample_noise(
            x, n, batch_size, _estimation_stream(selection_generator, estimation_generator),
            name="n",
        )
        return selection, estimation

    def _sample_noise(
        self,
        x: torch.Tensor,
        num: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        name: str = "num",
    ) -> np.ndarray:
        """Counts of the base classifier's predictions on `num` noisy copies of x."""
        num = stats.check_sample_count(num, name)
        batch_size = stats.check_positive_int(batch_size, "batch_size")
        device = model_device(self.base_classifier)
        x = self._checked_input(x, device)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        first = True
        with torch.inference_mode(), autocast(device, self.amp), eval_mode(self.base_classifier):
            buffer = self._noise_buffer(x, min(batch_size, num), device)
            remaining = num
            while remaining > 0:
                size = min(batch_size, remaining)
                # Noise is drawn and added in float32; autocast only casts inside the model.
                batch = buffer[:size].normal_(0.0, self.sigma, generator=generator).add_(x)
                logits = self._forward(batch, x.shape) if first else self.base_classifier(batch)
                first = False
                check_logits(logits, size, self.num_classes)
                finite &= torch.isfinite(logits).all()  # checked once at the end: no sync
                counts += torch.bincount(logits.argmax(dim=1), minlength=self.num_classes)
                remaining -= size
        if not bool(finite):
            raise ValueError(
                "the base classifier returned non-finite logits (NaN or inf) for noisy copies "
                "of x: its predictions, and so any certificate, would be meaningless"
            )
        return counts.cpu().numpy()

    def _checked_input(self, x: torch.Tensor, device: torch.device) -> torch.Tensor:
        """x as float32 on `device`, after the checks that keep the noise level meaningful."""
        if not isinstance(x, torch.Tensor):
            raise ValueError(
                f"x must be a torch.Tensor (one example, no batch axis), got {type(x)}"
            )
        if device.type == "meta":
            raise ValueError(
                "base_classifier is on the meta device (it has no weights): load its weights "
                "(e.g. to_empty() then load_state_dict()) before certifying"
            )
        if not x.is_floating_point():
            raise ValueError(
                f"x must be a floating-point tensor in the range the noise is calibrated to, "
                f"got dtype {x.dtype} (an integer 0..255 image needs x.float() / 255)"
            )
        if x.numel() == 0:
            raise ValueError(f"x must hold at least one value, got shape {tuple(x.shape)}")
        x = x.to(device=device, dtype=torch.float32)
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x must hold only finite values (found NaN or inf)")
        if self.input_range is not None:
            low, high = self.input_range
            x_min, x_max = float(x.min()), float(x.max())
            if x_min < low or x_max > high:
                raise ValueError(
                    f"x must lie in [{low:g}, {high:g}], got values in [{x_min:g}, {x_max:g}]: "
                    "sigma is relative to that range. For a base classifier taking another "
                    "range pass Smooth(..., input_range=(low, high)), or input_range=None"
                )
        return x

    @staticmethod
    def _noise_buffer(x: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
        # Contiguous on purpose: torch fills a channels_last buffer with a slow serial kernel,
        # and a channels_last model converts its input in its first conv anyway.
        return torch.empty((size, *x.shape), device=device, dtype=torch.float32)

    def _forward(self, batch: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """The first forward pass, which checks that model and input fit together."""
        try:
            logits = self.base_classifier(batch)
        except RuntimeError as err:
            raise ValueError(
                f"x: the base classifier rejected an input of shape {tuple(shape)} "
                f"(batched as {tuple(batch.shape)}): {err}"
            ) from err
        return logits

    def certify_radii(
        self,
        x: torch.Tensor,
        radii,
        alpha: float,
        max_n: int,
        batch_size: int,
        n0: int = 100,
        method: str = "certify",
        confidence_sequence: str = "mixture",
        generator: torch.Generator | None = None,
        estimation_generator: torch.Generator | None = None,
    ) -> RadiiCertificate:
        """Is x certified at each of `radii`? Samples in growing looks and stops each input as
        soon as every radius is decided (sequential.RadiiProcedure), at most n0 + max_n passes.

        method "certify" bounds pA alone, "tcertify" also the runner-up (T-CERTIFY's two
        bounds, alpha split evenly); the guarantee is CERTIFY's: a certified radius is wrong
        with probability <= alpha, whatever the stopping time. The generators are used as in
        `certify`; the certificate records the class counts.
        """
        procedure = sequential.RadiiProcedure(
            radii, self.sigma, alpha, max_n, method=method, num_classes=self.num_classes,
            confidence_sequence=confidence_sequence, batch_size=batch_size,
        )
        selection = self._sample_noise(x, n0, batch_size, generator, name="n0")
        label = int(np.argmax(selection))
        estimation_generator = _estimation_stream(generator, estimation_generator)
        counts = np.zeros(self.num_classes, dtype=np.int64)
        while (size := procedure.next_batch()) > 0:
            counts += self._sample_noise(x, size, batch_size, estimation_generator)
            procedure.update(counts[label], int(counts.sum()), np.delete(counts, label))
        return procedure.certificate(label, selection_counts=selection)

    def certify_adaptive(
        self,
        x: torch.Tensor,
        n0: int,
        max_n: int,
        alpha: float,
        batch_size: int,
        tolerance: float = 0.02,
        grid: int = 10,
        generator: torch.Generator | None = None,
        estimation_generator: torch.Generator | None = None,
    ) -> CertifyAllResult:
        """certify_all with each input's n chosen from its n0 selection counts alone
        (sequential.choose_n: expected radius loss against max_n <= tolerance), then drawn fresh
        (generators as in `certify`); the estimation counts record the n used."""
        stats.check_alpha_grid(alpha, grid)
        stats.check_sample_count(max_n, "max_n")
        sequential.check_tolerance(tolerance)
        selection = self._sample_noise(x, n0, batch_size, generator, name="n0")
        n = sequential.choose_n(selection, max_n, self.sigma, alpha, tolerance)
        estimation = self._sample_noise(
            x, n, batch_size, _estimation_stream(generator, estimation_generator), name="n")
        return CertifyAllResult.from_counts(selection, estimation, self.sigma, alpha, grid)
