"""compile="openvino" / --openvino: the base classifier run by OpenVINO (the openvino extra,
which the test extra installs), and what it must not change: which rows are counted, what the
sidecar records, the errors when it cannot run."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch
from test_compile import CERTIFY, TinyNet, certify, counts

from smoothcert import openvino_backend
from smoothcert.cli import main
from smoothcert.extras import MissingExtraError
from smoothcert.results import verify
from smoothcert.sampling import NoiseSampler
from smoothcert.sidecar import read


@pytest.mark.parametrize("num", [1, 127, 128, 300])
def test_openvino_counts_agree_with_eager_and_count_no_padded_row(num):
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.rand(1, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        sampler = NoiseSampler(model, 3, 0.5, compile="openvino")
        found = counts(sampler, x, num, 128)
    assert sampler.compiled is True and sampler.execution == "openvino"
    assert found.sum() == num  # the padded rows of a short batch are dropped
    eager = counts(NoiseSampler(model, 3, 0.5), x, num, 128)
    assert np.abs(found - eager).sum() <= 2  # OpenVINO's float32 kernels round differently


def test_under_amp_openvino_runs_at_its_own_low_precision():
    torch.manual_seed(0)
    model, x = TinyNet().eval(), torch.rand(1, 8, 8)
    sampler = NoiseSampler(model, 3, 0.5, amp="bf16", compile="openvino")
    found = counts(sampler, x, 200, 64)
    assert sampler.execution == "openvino bf16" and found.sum() == 200
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's, untouched


def test_without_the_extra_openvino_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    sampler = NoiseSampler(TinyNet(), 3, 0.5, compile="openvino")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(MissingExtraError, match=r"--openvino needs openvino, the optional "
                           r"extra: pip install 'smoothcert\[openvino\]'"):
            counts(sampler, torch.rand(1, 8, 8), 10, 8)
    assert sampler.compiled is None


def test_openvino_runs_on_the_cpu_only():
    with pytest.raises(ValueError, match=r"--openvino runs the base classifier on the CPU, "
                       r"got device cuda:0 \(use --device cpu\)"):
        openvino_backend.require_openvino(torch.device("cuda:0"))


def test_a_model_openvino_cannot_take_runs_eager_with_one_warning(monkeypatch):
    def unconvertible(*_args):
        raise RuntimeError("OpConversionFailure: no such operation\ndetails")

    monkeypatch.setattr("smoothcert.sampling.openvino_network", unconvertible)
    model, x = TinyNet().eval(), torch.rand(1, 8, 8)
    sampler = NoiseSampler(model, 3, 0.5, compile="openvino")
    with pytest.warns(RuntimeWarning, match=r"compile: OpenVINO failed \(RuntimeError: "
                      r"OpConversionFailure: no such operation\); the base classifier runs "
                      r"eager"):
        found = counts(sampler, x, 100, 32)
    assert sampler.compiled is False and sampler.execution is None
    assert found.tolist() == counts(NoiseSampler(model, 3, 0.5), x, 100, 32).tolist()


@pytest.mark.parametrize("amp, recorded", [("none", "openvino"), ("bf16", "openvino bf16")])
def test_an_openvino_run_is_recorded_and_verified(trained_checkpoint, tmp_path, amp, recorded):
    out, plain = tmp_path / "openvino.tsv", tmp_path / "eager.tsv"
    assert certify(str(trained_checkpoint), "--out", str(out), "--openvino", "--amp", amp,
                   *CERTIFY) == 0
    assert certify(str(trained_checkpoint), "--out", str(plain), "--amp", amp, *CERTIFY) == 0
    assert read(out).compile == recorded and read(plain).compile is None
    assert read(out).run != read(plain).run  # a file is OpenVINO's or eager, never both
    assert verify(out) == (3, [])


def test_compile_and_openvino_exclude_each_other(tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["certify", "c.pt", "--out", str(tmp_path / "r.tsv"), "--compile", "--openvino"])
    assert exited.value.code == 2
    assert "argument --openvino: not allowed with argument --compile" in capsys.readouterr().err
