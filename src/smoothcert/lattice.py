"""Sound sampling on the 8-bit lattice (Voráček & Hein, arXiv 2207.07209): the exact
distribution and its integer thresholds. No torch here; `sampling.LatticeNoise` draws with them.

An input is a lattice point x = a/255 (a = 0..255 per pixel). The noise is the Gaussian
N(0, sigma^2) rounded to the same lattice: the offset b (in units of 1/255) has probability
Phi((b + 1/2)/(255 sigma)) - Phi((b - 1/2)/(255 sigma)). The base classifier sees
fl32(clip(a + b)/255), the integer sum clipped to [-255 k, 255 (k + 1)] with the authors'
k = max(1, floor(6 sigma)) (their script clips the noisy image to [-k, k + 1]): a function
of the lattice point a + b alone. Offsets beyond B = 255 (k + 1) are drawn as +-B: for every
a in 0..255 the clipped sum is the same, so the classifier's input has exactly the
distribution of the untruncated one.

A draw is exact. The CDF values F_i = Phi((i - B + 1/2)/(255 sigma)) are irrational; a uniform U
in [0, 1) is read WORD_BITS bits at a time, and the bin (#{i : F_i <= U}) is decided by the
first word unless that word equals floor(F_i 2^WORD_BITS) for some i; then further words are
read and compared with floor(F_i 2^bits) at the longer precision (`resolve`), until decided.
With 63-bit words that happens about once in 10^16 draws. docs/statistics.md derives the
certificate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache, partial

import numpy as np

LEVELS = 255  # the lattice step is 1/LEVELS: 8-bit images
SOUND_MODES = ("exact", "round")  # refuse inputs off the lattice, or round them onto it
WORD_BITS = 63  # torch's int64 random_() draws [0, 2**63) uniformly
GUIDE_BITS = 16  # the guide table is indexed by a word's top bits (a uint16: see sampling)


def check_sound(sound: object) -> str | None:
    """`sound` as None (ordinary sampling), "exact" (True) or "round"."""
    if sound is None or sound is False:
        return None
    if sound is True:
        return "exact"
    if sound not in SOUND_MODES:
        raise ValueError(f"sound must be False, True, or one of {', '.join(SOUND_MODES)} "
                         f"(True is exact), got {sound!r}")
    return sound


def clip_levels(sigma: float) -> int:
    """The authors' k = max(1, floor(6 sigma)): noisy inputs are clipped to [-k, k + 1]."""
    return max(1, int(6 * sigma))


class LatticeGaussian:
    """N(0, sigma^2) rounded to the lattice Z/255, with integer thresholds to draw it exactly.

    Offsets b run over -B..B (B = 255 (k + 1)); bin j = b + B. `thresholds[i]` is
    floor(F_i 2^word_bits) for the 2B CDF values F_i; `guide[t]` is the bin of every word whose
    top guide_bits bits are t, or -1 where a threshold falls among those words.
    """

    def __init__(self, sigma: float, word_bits: int = WORD_BITS, guide_bits: int | None = None):
        guide_bits = min(GUIDE_BITS, word_bits) if guide_bits is None else guide_bits
        if not (isinstance(sigma, float) and math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be a finite float > 0, got {sigma!r}")
        if not 1 <= guide_bits <= word_bits <= WORD_BITS:
            raise ValueError(f"need 1 <= guide_bits <= word_bits <= {WORD_BITS}, got "
                             f"guide_bits={guide_bits}, word_bits={word_bits}")
        self.sigma, self.word_bits, self.guide_bits = sigma, word_bits, guide_bits
        self.k = clip_levels(sigma)
        self.half_width = LEVELS * (self.k + 1)  # B
        self.low, self.high = -LEVELS * self.k, LEVELS * (self.k + 1)  # the clip, in levels
        self._floors: dict[tuple[int, int], int] = {}
        self.thresholds = np.array(self._threshold_row(word_bits), dtype=np.int64)
        self.guide = self._guide()

    @property
    def bins(self) -> int:
        return 2 * self.half_width + 1

    def inputs(self) -> np.ndarray:
        """fl32(clip(s)/255) for s + B = 0 .. 2B + 255: the classifier's input at bin j of
        lattice point a is entry a + j."""
        sums = np.arange(-self.half_width, LEVELS + self.half_width + 1)
        return (np.clip(sums, self.low, self.high).astype(np.float32) / np.float32(LEVELS))

    def floor(self, i: int, bits: int) -> int:
        """floor(F_i 2^bits), exactly: F_i 2^bits is irrational, so never an integer."""
        key = (i, bits)
        if key not in self._floors:
            mirror = 2 * self.half_width - 1 - i  # F_mirror = 1 - F_i
            if i > mirror:
                self._floors[key] = (1 << bits) - 1 - self.floor(mirror, bits)
            else:
                self._floors[key] = _cdf_floor(2 * (i - self.half_width) + 1, self.sigma, bits)
        return self._floors[key]

    def probabilities(self) -> np.ndarray:
        """P(bin j) for j = 0 .. 2B (offset j - B), the tails beyond +-B in the end bins."""
        import mpmath

        with mpmath.workprec(128):
            cdf = [mpmath.ncdf(mpmath.mpf(2 * (i - self.half_width) + 1)
                               / (2 * LEVELS * mpmath.mpf(self.sigma)))
                   for i in range(2 * self.half_width)]
            edges = [mpmath.mpf(0), *cdf, mpmath.mpf(1)]
            return np.array([float(b - a) for a, b in zip(edges, edges[1:], strict=False)])

    def resolve(self, word: int, draw_word: Callable[[], int]) -> int:
        """The bin of a uniform whose first word is `word`, reading further words from
        `draw_word` while a threshold's floor at the precision read so far equals the prefix."""
        left = int(np.searchsorted(self.thresholds, word, side="left"))
        right = int(np.searchsorted(self.thresholds, word, side="right"))
        prefix, bits = word, self.word_bits
        while left < right:  # F_left..F_{right-1} share the prefix: more bits decide
            prefix, bits = (prefix << self.word_bits) | draw_word(), bits + self.word_bits
            # floors are nondecreasing in i: those below the prefix are <= U, above it > U
            floor_at = partial(self.floor, bits=bits)
            left, right = (_first_above(left, right, floor_at, prefix - 1),
                           _first_above(left, right, floor_at, prefix))
        return left

    def _threshold_row(self, bits: int) -> list[int]:
        return [self.floor(i, bits) for i in range(2 * self.half_width)]

    def _guide(self) -> np.ndarray:
        """Each top-bits bucket's bin where no threshold falls in it, else -1."""
        shift = self.word_bits - self.guide_bits
        starts = np.arange(1 << self.guide_bits, dtype=np.int64) << shift
        ends = starts + ((1 << shift) - 1)
        first = np.searchsorted(self.thresholds, starts, side="left")  # thresholds < start
        last = np.searchsorted(self.thresholds, ends, side="right")  # thresholds <= end
        return np.where(first == last, first, -1).astype(np.int32)


def _first_above(low: int, high: int, value: Callable[[int], int], bound: int) -> int:
    """The first i in [low, high) with value(i) > bound, value nondecreasing (high if none)."""
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if value(middle) > bound else (middle + 1, high)
    return low


def _cdf_floor(numerator: int, sigma: float, bits: int) -> int:
    """floor(Phi(numerator / (510 sigma)) 2^bits) for an odd numerator, with enough working
    precision that the floor is certain (the fraction's distance to an integer exceeds the
    error bound); sigma, a double, is an exact binary fraction."""
    import mpmath

    precision = bits + 64
    while True:
        with mpmath.workprec(precision):
            z = mpmath.mpf(numerator) / (2 * LEVELS * mpmath.mpf(sigma))
            value = mpmath.ldexp(mpmath.ncdf(z), bits)
            whole = int(mpmath.floor(value))
            fraction = value - whole
            error = mpmath.ldexp(max(value, 1), 16 - precision)  # mpmath's, with room
            if error < fraction < 1 - error:
                return whole
        precision *= 2


@lru_cache(maxsize=8)
def lattice_gaussian(sigma: float, word_bits: int = WORD_BITS) -> LatticeGaussian:
    """The (cached) LatticeGaussian of `sigma`: its tables take a fraction of a second."""
    return LatticeGaussian(float(sigma), word_bits)
