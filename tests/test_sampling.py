"""NoiseSampler: the counts every certificate rests on (the checks run through Smooth are in
test_smooth.py)."""

import numpy as np
import pytest
import torch

from smoothcert import Smooth
from smoothcert.sampling import NoiseSampler


def test_counts_follow_the_generator_and_are_what_smooth_certifies_from(threshold_classifier):
    sampler = NoiseSampler(threshold_classifier, 4, sigma=0.5)
    x = torch.tensor([0.3, 0.0])

    def counts(seed: int) -> np.ndarray:
        return sampler.counts(x, 500, 64, torch.Generator().manual_seed(seed))

    assert counts(7).sum() == 500 and counts(7).dtype == np.int64
    assert np.array_equal(counts(7), counts(7)) and not np.array_equal(counts(7), counts(8))
    smooth = Smooth(threshold_classifier, 4, 0.5)
    result = smooth.certify_all(x, 500, 100, 0.01, 64, generator=torch.Generator().manual_seed(7))
    assert np.array_equal(result.selection_counts, counts(7))


def test_a_bad_count_is_named_by_the_argument_it_came_from(threshold_classifier):
    sampler = NoiseSampler(threshold_classifier, 4, sigma=0.5)
    with pytest.raises(ValueError, match=r"^n0 must be an integer in \[1, "):
        sampler.counts(torch.zeros(2), 0, 10, name="n0")


def test_smooth_samples_through_its_sampler(threshold_classifier):
    """Replacing `Smooth.sampler` (as benchmarks/_loops.py does) changes what is sampled."""
    smooth = Smooth(threshold_classifier, 4, 0.5)
    smooth.sampler = NoiseSampler(threshold_classifier, 4, 0.5, input_range=(-5.0, 5.0))
    assert smooth.certify(torch.tensor([4.0, 0.0]), 10, 100, 0.01, 100)[0] == 3  # not in [0, 1]
    assert (smooth.base_classifier, smooth.num_classes, smooth.sigma) == (
        threshold_classifier, 4, 0.5)
