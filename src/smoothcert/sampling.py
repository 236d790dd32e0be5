"""Noisy copies of one input through the base classifier, counted per class.

`NoiseSampler` is what every certificate rests on: it checks the input against the range the
noise is calibrated to, draws the noise (`GaussianNoise`: float32 Gaussian; `LatticeNoise`: the
sound sampling of `lattice`), runs the base classifier in eval mode (under autocast when
asked), checks each of its untrusted outputs and counts the votes. `Smooth` and the sequential
procedures only ask it for counts.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import stats
from .lattice import GUIDE_BITS, LEVELS, WORD_BITS, check_sound, lattice_gaussian
from .openvino_backend import openvino_network, require_openvino
from .perf import AMP

AMP_DTYPES = dict(zip(AMP, (torch.bfloat16, torch.float16), strict=True))
# NoiseSampler's compile argument -> the compiler (None: eager)
COMPILERS: dict[bool | str, str | None] = {False: None, True: "inductor",
                                           "inductor": "inductor", "openvino": "openvino"}


def autocast(device: torch.device, amp: str | None):
    """Autocast to `amp` ("bf16"/"fp16") on `device`, or nothing for amp=None."""
    if amp is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
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


class CastNetwork(nn.Module):
    """A copy of `network` with its floating-point weights in `dtype`, taking float32 input
    and returning float32 logits, autocast off inside: what `compile` runs under amp.

    Inductor compiles this form into native low-precision kernels; an autocast graph of the
    same network ran slower than eager autocast (docs/benchmarks.md, issue 26).
    """

    def __init__(self, network: nn.Module, dtype: torch.dtype):
        super().__init__()
        with torch.inference_mode(False):  # a copy of plain tensors, whatever the caller's mode
            self.network = copy.deepcopy(network).to(dtype)
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self.network(x.to(self.dtype)).float()


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


def check_input_range(input_range: object) -> tuple[float, float]:
    """(low, high) as floats: finite, low < high."""
    try:
        low, high = (float(value) for value in input_range)
    except (TypeError, ValueError):
        low = high = float("nan")
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(
            f"input_range must be None or finite (low, high) with low < high, got {input_range!r}"
        )
    return low, high


def check_num_classes(num_classes: object) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    return num_classes


def estimation_stream(
    generator: torch.Generator | None, estimation_generator: torch.Generator | None
) -> torch.Generator | None:
    """The estimation samples' generator: their own, or where the selection samples left off."""
    return generator if estimation_generator is None else estimation_generator


class GaussianNoise:
    """Cohen's noisy copies: x + N(0, sigma^2 I) drawn by torch in float32, one float32 sum."""

    def __init__(self, sigma: float):
        self.sigma = sigma

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def fill(self, out: torch.Tensor, x: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
        """`out` [size, *x.shape] filled with noisy copies of x."""
        return out.normal_(0.0, self.sigma, generator=generator).add_(x)


class LatticeNoise:
    """Sound noisy copies (`lattice`): x = a/255 on the 8-bit lattice, the offsets b of the
    Gaussian rounded to the lattice drawn exactly, the classifier's input fl32(clip(a + b)/255).

    mode "exact" refuses an x off the lattice, "round" rounds it to the nearest lattice point.
    """

    def __init__(self, sigma: float, mode: str, word_bits: int = WORD_BITS):
        self.mode = mode
        self.distribution = lattice_gaussian(sigma, word_bits)
        self._tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """The lattice points a (int32) of x, a float32 tensor in [0, 1]."""
        levels = torch.round(x.double() * LEVELS)
        if self.mode == "exact":
            off = (levels / LEVELS).float() != x
            if bool(off.any()):
                value = float(x[off][0])
                raise ValueError(
                    f"x: sound sampling takes inputs on the 8-bit lattice a/255 (a = 0..255), "
                    f"but {int(off.sum())} of its {x.numel()} values are not (e.g. {value!r}, "
                    f"near {int(round(value * LEVELS))}/255); pass sound='round' (--sound "
                    "round) to round them onto the lattice")
        return levels.to(torch.int32)

    def fill(self, out: torch.Tensor, points: torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
        """`out` [size, *points.shape] filled with the classifier's inputs at lattice `points`.

        Each uniform's top guide_bits bits are drawn first; the guide table gives the bin of
        most; only where a threshold falls in the guide bucket are the word's other bits drawn
        (independent of the first, so the word is uniform) and the bin searched for."""
        guide, thresholds, inputs = self._device_tables(out.device)
        d = self.distribution
        buckets = _random_buckets(out.numel(), d.guide_bits, out.device, generator)
        bins = torch.index_select(guide, 0, buckets)
        unsure = (bins < 0).nonzero().flatten()
        if len(unsure):
            rest = d.word_bits - d.guide_bits
            words = buckets[unsure].long() << rest
            if rest:
                words |= _random_words(torch.empty_like(words), rest, generator)
            bins[unsure] = self._search(words, thresholds, generator)
        torch.index_select(inputs, 0, bins.view(out.shape).add_(points).view(-1),
                           out=out.view(-1))
        return out

    def _search(self, words: torch.Tensor, thresholds: torch.Tensor,
                generator: torch.Generator | None) -> torch.Tensor:
        """The bins of `words` by binary search; a word equal to a threshold's floor (once in
        about 10^16 draws) is decided by further words (`LatticeGaussian.resolve`)."""
        left = torch.searchsorted(thresholds, words)
        tied = (left != torch.searchsorted(thresholds, words, right=True)).nonzero()
        for i in tied.flatten().tolist():
            left[i] = self.distribution.resolve(
                int(words[i]), lambda: self._word(words.device, generator))
        return left.to(torch.int32)

    def _word(self, device: torch.device, generator: torch.Generator | None) -> int:
        word = torch.empty(1, dtype=torch.int64, device=device)
        return int(_random_words(word, self.distribution.word_bits, generator))

    def _device_tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._tables:
            d = self.distribution
            self._tables[device] = tuple(torch.from_numpy(t).to(device) for t in (
                d.guide, d.thresholds, d.inputs()))
        return self._tables[device]


def _random_buckets(count: int, bits: int, device: torch.device,
                    generator: torch.Generator | None) -> torch.Tensor:
    """`count` independent uniform integers in [0, 2**bits) (int32). GUIDE_BITS (16): four
    from each 64-bit draw, as torch's generator costs about as much per element whatever the
    width."""
    if bits != GUIDE_BITS:
        return torch.empty(count, dtype=torch.int32, device=device).random_(
            0, 1 << bits, generator=generator)
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), None, generator=generator)  # all 64 bits
    return words.view(torch.uint16)[:count].to(torch.int32)


def _random_words(words: torch.Tensor, bits: int, generator: torch.Generator | None
                  ) -> torch.Tensor:
    """`words` (int64) filled with independent uniform integers in [0, 2**bits)."""
    if bits == WORD_BITS:  # random_() of an int64 tensor: [0, 2**63), the whole range
        return words.random_(generator=generator)
    return words.random_(0, 1 << bits, generator=generator)


class NoiseSampler:
    """Counts of `base_classifier`'s votes on noisy copies x + N(0, sigma^2 I) of one input.

    The noise is calibrated to inputs in `input_range` ([0, 1] pixels by default; None: any
    finite input); inputs outside it are refused. `sound` (True or "exact", or "round") draws
    the sound noise of `LatticeNoise` instead (inputs in [0, 1] only): certificates then hold
    against perturbations on the 8-bit lattice whatever the base classifier does with the
    low bits of its float inputs (docs/statistics.md). The base classifier runs in eval mode,
    each submodule's previous mode given back afterwards, even when sampling fails. Its outputs
    are untrusted: each must be finite logits, one row per input and num_classes columns, or
    sampling stops with a ValueError.

    compile=True runs the base classifier compiled by torch.compile (inductor, freezing, static
    shapes) at its first forward pass: every forward pass then sees `batch_size` inputs, a
    shorter batch padded with rows whose outputs are dropped, so one graph serves every call
    with that batch size. Freezing makes the weights constants of the graph: changing them
    afterwards is not seen. Under amp the compiled network is `CastNetwork`, its weights cast
    to the amp dtype, not autocast: another low-precision network than eager amp runs, named
    by `execution`. compile="openvino" runs it by OpenVINO instead (`openvino_backend`: the
    smoothcert[openvino] extra, CPU only), with the same static batch. Where compilation fails
    it warns once and runs eager; `compiled` says which ran (None before the first forward
    pass).
    """

    def __init__(
        self,
        base_classifier: nn.Module,
        num_classes: int,
        sigma: float,
        *,
        amp: str | None = None,
        input_range: tuple[float, float] | None = (0.0, 1.0),
        sound: bool | str | None = None,
        compile: bool | str = False,
    ):
        self.num_classes = check_num_classes(num_classes)
        if not (isinstance(compile, (bool, str)) and compile in COMPILERS):
            raise ValueError(f"compile must be True, False or one of "
                             f"{', '.join(c for c in COMPILERS if isinstance(c, str))}, got "
                             f"{compile!r}")
        if amp is not None and amp not in AMP_DTYPES:
            raise ValueError(f"amp must be None or one of {', '.join(AMP_DTYPES)}, got {amp!r}")
        self.base_classifier = base_classifier
        self.sigma = stats.check_sigma(sigma)
        self.amp = amp
        self.input_range = None if input_range is None else check_input_range(input_range)
        self.sound = check_sound(sound)
        if self.sound and self.input_range != (0.0, 1.0):
            raise ValueError(f"input_range must be (0, 1) with sound sampling (its lattice is "
                             f"a/255 in [0, 1]), got {input_range!r}")
        self.noise = (LatticeNoise(self.sigma, self.sound) if self.sound
                      else GaussianNoise(self.sigma))
        self.compile: str | None = COMPILERS[compile]
        self.compiled: bool | None = None if self.compile else False
        self._graph: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def execution(self) -> bool | str | None:
        """How the network ran, as the sidecar's `compile` records it: None (eager), True
        (inductor, float32), "<amp> weights" (inductor, as CastNetwork), "openvino" or
        "openvino <amp>" (OpenVINO at that inference precision)."""
        if not self.compiled:
            return None
        if self.compile == "openvino":
            return "openvino" if self.amp is None else f"openvino {self.amp}"
        return True if self.amp is None else f"{self.amp} weights"

    def counts(
        self,
        x: torch.Tensor,
        num: int,
        batch_size: int,
        generator: torch.Generator | None = None,
        name: str = "num",
    ) -> np.ndarray:
        """Counts of the base classifier's predictions on `num` noisy copies of x (`name`:
        the argument that gave num, for the error message)."""
        num = stats.check_sample_count(num, name)
        batch_size = stats.check_positive_int(batch_size, "batch_size")
        device = model_device(self.base_classifier)
        x = self._checked_input(x, device)
        prepared = self.noise.prepare(x)
        counts = torch.zeros(self.num_classes, dtype=torch.long, device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        first = True
        with torch.inference_mode(), autocast(device, self.amp), eval_mode(self.base_classifier):
            padded = self.compiled is not False  # the graph's one shape: batch_size inputs
            buffer = self._noise_buffer(x, batch_size if padded else min(batch_size, num),
                                        device)
            if padded:  # rows past a short batch are computed, never counted
                buffer.zero_()
            remaining = num
            while remaining > 0:
                size = min(batch_size, remaining)
                # Noisy copies are made in float32; autocast only casts inside the model.
                self.noise.fill(buffer[:size], prepared, generator)
                logits = self._logits(buffer, size, x.shape, first)
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
        self._check_range(x)
        return x

    def _check_range(self, x: torch.Tensor) -> None:
        if self.input_range is None:
            return
        low, high = self.input_range
        x_min, x_max = float(x.min()), float(x.max())
        if x_min < low or x_max > high:
            raise ValueError(
                f"x must lie in [{low:g}, {high:g}], got values in [{x_min:g}, {x_max:g}]: "
                "sigma is relative to that range. For a base classifier taking another "
                "range pass Smooth(..., input_range=(low, high)), or input_range=None"
            )

    @staticmethod
    def _noise_buffer(x: torch.Tensor, size: int, device: torch.device) -> torch.Tensor:
        # Contiguous on purpose: torch fills a channels_last buffer with a slow serial kernel,
        # and a channels_last model converts its input in its first conv anyway.
        return torch.empty((size, *x.shape), device=device, dtype=torch.float32)

    def _logits(self, buffer: torch.Tensor, size: int, shape: torch.Size,
                first: bool) -> torch.Tensor:
        """The base classifier's logits of buffer's first `size` rows; the first forward pass
        checks that model and input fit together (and compiles, where asked)."""
        if self.compiled is None:
            return self._compile(buffer, size, shape)
        if self._graph is not None:
            return check_logits(self._graph(buffer), len(buffer))[:size]
        batch = buffer[:size]
        return self._forward(batch, shape) if first else self.base_classifier(batch)

    def _compile(self, buffer: torch.Tensor, size: int, shape: torch.Size) -> torch.Tensor:
        """The first forward pass through the compiled model; eager, with a warning, where
        compilation fails (and an error where eager fails too: the model's, not inductor's)."""
        if self.compile == "openvino":  # asked for: an error, not eager, where it cannot run
            require_openvino(buffer.device)
        try:
            graph = self._compiled_network(buffer)
            logits = graph(buffer)
        except Exception as err:  # whatever dynamo or inductor raise: eager may still work
            logits = self._forward(buffer[:size], shape)
            self.compiled = False
            reason = (str(err).strip().splitlines() or [""])[0]
            compiler = "OpenVINO" if self.compile == "openvino" else "torch.compile"
            warnings.warn(f"compile: {compiler} failed ({type(err).__name__}: {reason}); "
                          "the base classifier runs eager", RuntimeWarning, stacklevel=2)
            return logits
        self._graph, self.compiled = graph, True
        return check_logits(logits, len(buffer))[:size]

    def _compiled_network(self, buffer: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.compile == "openvino":
            return openvino_network(self.base_classifier, buffer, self.amp,
                                    torch.get_num_threads())
        network = (self.base_classifier if self.amp is None
                   else CastNetwork(self.base_classifier, AMP_DTYPES[self.amp]))
        return torch.compile(network, dynamic=False, fullgraph=True, options={"freezing": True})

    def _forward(self, batch: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """An eager forward pass that checks that model and input fit together."""
        try:
            logits = self.base_classifier(batch)
        except RuntimeError as err:
            raise ValueError(
                f"x: the base classifier rejected an input of shape {tuple(shape)} "
                f"(batched as {tuple(batch.shape)}): {err}"
            ) from err
        return logits
