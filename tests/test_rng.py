"""Random streams: distinct addresses give distinct streams, and certification never draws the
noise that training drew."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from conftest import InputRecorder

from smoothcert import rng, runner, train
from smoothcert.presets import resolve_config
from smoothcert.runner import RunConfig, Runner
from smoothcert.smooth import Smooth

SEEDS = [0, 1, 2, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, 2**64 - 1]
INDICES = [0, 1, 2, 1_000_003, 2**32 - 1, 2**32, 2**62, 2**63 - 1]


def test_distinct_addresses_give_distinct_seeds_and_states():
    addresses = list(itertools.product(SEEDS, rng.PURPOSES, INDICES))
    seeds = {rng.int_seed(*address) for address in addresses}
    states = {tuple(rng.seed_sequence(*address).generate_state(8)) for address in addresses}
    assert len(seeds) == len(states) == len(addresses)
    # The collisions of seed * 1_000_003 + index and of variable-width entropy words:
    assert rng.int_seed(0, "training-noise", 1_000_003) != rng.int_seed(1, "training-noise", 0)
    assert rng.int_seed(2**32, "selection", 0) != rng.int_seed(0, "selection", 2**32)
    assert all(0 <= seed < 2**63 for seed in seeds)


def test_cpu_generators_use_the_whole_stream_state():
    # manual_seed keeps 32 bits on CPU: two seeds equal modulo 2^32 would draw the same noise.
    same = [torch.Generator().manual_seed(s) for s in (5, 5 + 2**32)]
    assert torch.equal(torch.randn(8, generator=same[0]), torch.randn(8, generator=same[1]))
    words = rng.seed_sequence(3, "estimation", 7).generate_state(624)
    state = rng.generator(3, "estimation", 7).get_state().numpy()[24 : 24 + 8 * 624]
    assert np.array_equal(state.view(np.uint64), words.astype(np.uint64))


def test_streams_are_reproducible_and_distinct():
    def draw(*address):
        return torch.randn(16, generator=rng.generator(*address))

    assert torch.equal(draw(0, "selection", 4), draw(0, "selection", 4))
    assert not torch.equal(draw(0, "selection", 4), draw(0, "estimation", 4))
    assert not torch.equal(draw(0, "selection", 4), draw(0, "selection", 5))
    rng.seed_torch(9, "model-init")
    first = torch.rand(4)
    rng.seed_torch(9, "model-init")
    assert torch.equal(torch.rand(4), first)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((-1, "selection", 0), r"^seed must be an integer in \[0, 2\*\*64\)"),
        ((2**64, "selection", 0), "^seed must be"),
        ((0, "selection", -1), "^index must be"),
        ((0.5, "selection", 0), "^seed must be"),
        ((0, "noise", 0), "^purpose must be one of model-init"),
    ],
)
def test_bad_addresses_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        rng.seed_sequence(*args)


def test_certification_never_draws_the_noise_training_drew(tmp_path, monkeypatch):
    """Default seeds (0 for both): each draw of certify is compared with every training draw."""
    drawn = []

    def recording_draw_noise(cfg, ctx, x, generator):
        noise = draw_noise(cfg, ctx, x, generator)
        drawn.append(noise.flatten(0, 1).flatten(1) / cfg.sigma)
        return noise

    draw_noise = train.draw_noise
    monkeypatch.setattr(train, "draw_noise", recording_draw_noise)
    cfg = resolve_config("mnist-lenet", sigma=0.5, k=2, epochs=2, batch=32, train_subset=64,
                         eval_subset=0, device="cpu", out=str(tmp_path / "run"))
    checkpoint = train.train(cfg, progress=False)

    recorders = []

    def recording_smooth(model, *args, **kwargs):
        recorders.append(InputRecorder(model))
        return Smooth(recorders[-1], *args, **kwargs)

    monkeypatch.setattr(runner, "Smooth", recording_smooth)
    run = Runner(RunConfig(str(checkpoint), str(tmp_path / "out.tsv"), n0=8, n=24, batch=16,
                           max=3, device="cpu", channels_last=False), progress=False)
    run.run()
    rows = torch.cat(recorders[0].batches).flatten(1)
    images = [run.dataset[idx][0].flatten() for idx in range(3)]
    certified = (rows - torch.cat([x.expand(32, -1) for x in images])) / 0.5
    trained = torch.cat(drawn)
    assert len(certified) == 3 * 32 and len(trained) == 2 * 2 * 32 * 2
    # A repeated draw would be within float rounding (1e-6); independent ones are ~sqrt(2 * 64).
    distances = torch.cdist(certified[:, :64], torch.cat([trained, certified])[:, :64])
    distances[:, len(trained):].fill_diagonal_(float("inf"))
    assert distances.min() > 1.0
