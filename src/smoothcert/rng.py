"""Independent random streams, each addressed by (seed, purpose, index).

Every stream is derived through `numpy.random.SeedSequence` from the three numbers, each
written as fixed-width 32-bit words, so two different addresses always give two different
SeedSequence states (SeedSequence's mixing is a bijection of its input words when they fit its
pool): training noise can never be certification noise, and epoch 1_000_003 of seed 0 is not
epoch 0 of seed 1. A CPU `torch.Generator` seeded with `manual_seed` keeps only the low 32 bits
of its seed, so CPU generators get their whole Mersenne-Twister state from the SeedSequence;
other devices (CUDA's Philox) take a 64-bit seed.
"""

from __future__ import annotations

import numpy as np
import torch

# Append only: a purpose's code is its position, and changing it changes every stream.
PURPOSES = (
    "model-init",  # the initial weights
    "data-order",  # the training sampler's shuffle
    "training",  # torch's global generator during an epoch: augmentation, dropout, draw picks
    "training-noise",  # the Gaussian noise of the training objectives
    "eval-noise",  # the noisy accuracy logged after each epoch
    "selection",  # CERTIFY's n0 selection samples
    "estimation",  # CERTIFY's n estimation samples
    "prediction",  # PREDICT's samples
)
_WORD = 2**32
_LIMIT = 2**64
_POOL_WORDS = 8  # >= the 5 entropy words, so the SeedSequence pool is injective in them
_MT_WORDS = 624  # the Mersenne-Twister state of torch's CPU generator
_MT_OFFSET = 24  # bytes before it in torch's CPU generator state (checked in _set_mt_state)


def seed_sequence(seed: int, purpose: str, index: int = 0) -> np.random.SeedSequence:
    """The SeedSequence of stream `index` of `purpose` in a run seeded with `seed`."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {', '.join(PURPOSES)}, got {purpose!r}")
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
        if not 0 <= value < _LIMIT:
            raise ValueError(f"{name} must be an integer in [0, 2**64), got {value!r}")
    seed, index = int(seed), int(index)
    words = [seed % _WORD, seed // _WORD, PURPOSES.index(purpose), index % _WORD, index // _WORD]
    return np.random.SeedSequence(words, pool_size=_POOL_WORDS)


def int_seed(seed: int, purpose: str, index: int = 0) -> int:
    """A 63-bit integer seed of the stream, for APIs that take an int (e.g. samplers)."""
    return int(seed_sequence(seed, purpose, index).generate_state(1, np.uint64)[0] >> 1)


def generator(
    seed: int, purpose: str, index: int = 0, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A torch.Generator on `device` that draws the stream."""
    sequence = seed_sequence(seed, purpose, index)
    gen = torch.Generator(device=device)
    _seed(gen, sequence)
    return gen


def seed_torch(seed: int, purpose: str, index: int = 0) -> None:
    """Seed torch's global generators (CPU and every CUDA device) with the stream."""
    sequence = seed_sequence(seed, purpose, index)
    _seed(torch.default_generator, sequence)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(_seed64(sequence))


def _seed64(sequence: np.random.SeedSequence) -> int:
    return int(sequence.generate_state(1, np.uint64)[0])


def _seed(gen: torch.Generator, sequence: np.random.SeedSequence) -> None:
    gen.manual_seed(_seed64(sequence))
    if gen.device.type == "cpu":
        _set_mt_state(gen, sequence.generate_state(_MT_WORDS, np.uint32))


def _set_mt_state(gen: torch.Generator, words: np.ndarray) -> None:
    """Replace the Mersenne-Twister words of a freshly seeded CPU generator by `words`."""
    state = gen.get_state().numpy().copy()
    view = state[_MT_OFFSET : _MT_OFFSET + 8 * _MT_WORDS].view(np.uint64)
    # manual_seed(s) fills the words with MT19937's init_genrand(s & 0xffffffff), as numpy's
    # legacy RandomState does: if they are not where we expect, torch changed its layout.
    seeded = np.random.RandomState(gen.initial_seed() % _WORD).get_state()[1]
    if not np.array_equal(view, seeded.astype(np.uint64)):
        raise RuntimeError(
            f"torch {torch.__version__} stores its CPU generator state in an unknown layout; "
            "smoothcert.rng cannot seed it"
        )
    view[:] = words
    gen.set_state(torch.from_numpy(state))
