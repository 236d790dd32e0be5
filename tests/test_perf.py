import platform

import pytest
import torch

from smoothcert import perf


def test_tune_allocator_applies_on_glibc_linux():
    applied = perf.tune_allocator()
    assert applied == (platform.system() == "Linux" and perf.glibc_version() is not None)


def test_set_threads_sets_and_validates():
    before = torch.get_num_threads()
    try:
        assert perf.set_threads(1) == 1
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="num_threads"):
            perf.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_physical_cores_is_positive_and_at_most_the_logical_count():
    import os

    assert 1 <= perf.physical_cores() <= (os.cpu_count() or 1)
