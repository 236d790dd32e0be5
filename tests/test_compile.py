"""compile=True / --compile: the forward pass compiled by torch.compile, and what it must not
change: which rows are counted, the counts, the sidecar's record of how the network ran.

Most tests put a stand-in for torch.compile (`FakeCompiler`: the model itself, behind the
compiled call's checks) so that they run in milliseconds; the ones marked `inductor` compile
for real, a tiny model in one and the trained LeNet in the other.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from conftest import ThresholdClassifier
from test_distributed import without_time
from torch import nn

from smoothcert import Smooth
from smoothcert.cli import main
from smoothcert.results import verify
from smoothcert.sampling import CastNetwork, NoiseSampler
from smoothcert.sidecar import read

CERTIFY = ["--n0", "10", "--n", "150", "--batch", "64", "--max", "3", "--device", "cpu"]


class FakeCompiler:
    """torch.compile's stand-in: records each compile and the shape of every compiled call."""

    def __init__(self, fail: bool = False):
        self.fail, self.compiles, self.shapes, self.models = fail, [], [], []

    def __call__(self, model, **options):
        self.compiles.append(options)
        self.models.append(model)

        def compiled(batch: torch.Tensor) -> torch.Tensor:
            if self.fail:
                raise RuntimeError("inductor: no kernel for this operator\nsecond line")
            self.shapes.append(tuple(batch.shape))
            return model(batch)

        return compiled


@pytest.fixture
def fake_compile(monkeypatch) -> FakeCompiler:
    compiler = FakeCompiler()
    monkeypatch.setattr(torch, "compile", compiler)
    return compiler


@pytest.fixture
def failing_compile(monkeypatch) -> FakeCompiler:
    compiler = FakeCompiler(fail=True)
    monkeypatch.setattr(torch, "compile", compiler)
    return compiler


def counts(sampler: NoiseSampler, x: torch.Tensor, num: int, batch: int, seed: int = 3):
    return sampler.counts(x, num, batch, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("num", [1, 63, 64, 65, 200, 256])
def test_padded_rows_are_never_counted(fake_compile, num):
    # Padded rows are zeros at first (class 0 here) and later the previous batch's noisy
    # copies: counting either changes the counts or their total.
    model = ThresholdClassifier([0.25, 0.75])
    x = torch.full((1, 4, 4), 0.5)
    compiled = NoiseSampler(model, 3, 0.25, compile=True)
    eager = NoiseSampler(model, 3, 0.25)
    found = counts(compiled, x, num, 64)
    assert found.sum() == num
    assert found.tolist() == counts(eager, x, num, 64).tolist()
    assert set(fake_compile.shapes) == {(64, 1, 4, 4)}  # one static shape: the full batch
    assert compiled.compiled is True


def test_one_graph_serves_every_call(fake_compile):
    smooth = Smooth(ThresholdClassifier([0.5]), 2, 0.25, compile=True)
    x = torch.full((1, 2, 2), 0.4)
    for _ in range(3):
        smooth.certify(x, 10, 100, 0.001, 32)
    assert len(fake_compile.compiles) == 1
    (options,) = fake_compile.compiles
    assert options["dynamic"] is False and options["options"] == {"freezing": True}
    assert set(fake_compile.shapes) == {(32, 1, 2, 2)}


def test_a_failed_compilation_warns_once_and_runs_eager(failing_compile):
    model = ThresholdClassifier([0.25, 0.75])
    x = torch.full((1, 4, 4), 0.5)
    smooth = Smooth(model, 3, 0.25, compile=True)
    with pytest.warns(RuntimeWarning) as caught:
        first = smooth.certify(x, 10, 100, 0.001, 64, generator=torch.Generator().manual_seed(1))
        second = smooth.certify(x, 10, 100, 0.001, 64, generator=torch.Generator().manual_seed(1))
    assert len(caught) == 1
    assert "torch.compile failed (RuntimeError: inductor: no kernel for this operator); the " \
        "base classifier runs eager" in str(caught[0].message)
    assert smooth.sampler.compiled is False
    eager = Smooth(model, 3, 0.25).certify(x, 10, 100, 0.001, 64,
                                          generator=torch.Generator().manual_seed(1))
    assert first == second == eager
    assert len(failing_compile.compiles) == 1  # not tried again


def test_a_model_that_rejects_the_input_is_reported_as_eager_reports_it(failing_compile):
    model = nn.Sequential(nn.Flatten(), nn.Linear(5, 2))  # the input has 16 values
    smooth = Smooth(model, 2, 0.25, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no compile warning: the model's error is the news
        with pytest.raises(ValueError, match="the base classifier rejected an input of shape"):
            smooth.certify(torch.full((1, 4, 4), 0.5), 10, 100, 0.001, 64)
    assert smooth.sampler.compiled is None  # undecided: a later call may try again


def test_amp_compiles_a_copy_with_its_weights_cast(fake_compile):
    torch.manual_seed(0)
    model, x = TinyNet(), torch.rand(1, 8, 8)
    sampler = NoiseSampler(model, 3, 0.5, amp="bf16", compile=True)
    found = counts(sampler, x, 100, 64)
    (network,) = fake_compile.models
    assert isinstance(network, CastNetwork) and network.network is not model
    assert {p.dtype for p in network.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.parameters()} == {torch.float32}  # the caller's, untouched
    assert sampler.execution == "bf16 weights"
    eager_cast = NoiseSampler(CastNetwork(model, torch.bfloat16), 3, 0.5)
    assert found.tolist() == counts(eager_cast, x, 100, 64).tolist()


def test_execution_names_what_ran(fake_compile):
    x = torch.rand(1, 8, 8)
    fp32 = NoiseSampler(TinyNet(), 3, 0.5, compile=True)
    assert fp32.execution is None  # not yet decided
    counts(fp32, x, 10, 8)
    assert fp32.execution is True and not isinstance(fake_compile.models[0], CastNetwork)
    eager = NoiseSampler(TinyNet(), 3, 0.5, amp="bf16")
    counts(eager, x, 10, 8)
    assert eager.execution is None


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_compile_must_be_a_bool_or_a_compiler(value):
    with pytest.raises(ValueError, match="compile must be True, False or one of inductor, "
                       f"openvino, got {value!r}"):
        Smooth(ThresholdClassifier([0.5]), 2, 0.25, compile=value)


def test_eager_samples_as_before_without_compile(fake_compile):
    sampler = NoiseSampler(ThresholdClassifier([0.5]), 2, 0.25)
    counts(sampler, torch.full((1, 2, 2), 0.4), 100, 32)
    assert fake_compile.compiles == [] and sampler.compiled is False


# The result files -------------------------------------------------------------------------


def certify(*args: str) -> int:
    return main(["--no-progress", "certify", *args])


def test_a_compiled_run_is_recorded_and_verified(trained_checkpoint, tmp_path, fake_compile):
    out, plain = tmp_path / "compiled.tsv", tmp_path / "eager.tsv"
    assert certify(str(trained_checkpoint), "--out", str(out), "--compile", *CERTIFY) == 0
    assert certify(str(trained_checkpoint), "--out", str(plain), *CERTIFY) == 0
    compiled, eager = read(out), read(plain)
    assert compiled.compile is True and eager.compile is None
    assert "compile" not in json.loads(plain.with_name("eager.tsv.json").read_text())
    assert compiled.run != eager.run  # a file's rows are all compiled or all eager
    assert verify(out) == (3, [])
    assert {shape[0] for shape in fake_compile.shapes} == {64}


def test_a_compiled_bf16_run_names_its_cast_weights(trained_checkpoint, tmp_path,
                                                    fake_compile):
    out, fp32 = tmp_path / "bf16.tsv", tmp_path / "fp32.tsv"
    assert certify(str(trained_checkpoint), "--out", str(out), "--compile", "--amp", "bf16",
                   *CERTIFY) == 0
    assert certify(str(trained_checkpoint), "--out", str(fp32), "--compile", *CERTIFY) == 0
    assert read(out).compile == "bf16 weights" and read(out).amp == "bf16"
    assert read(out).run != read(fp32).run
    assert verify(out) == (3, [])


def test_eager_rows_are_not_resumed_by_a_compiled_run(trained_checkpoint, tmp_path, capsys,
                                                       fake_compile):
    out = tmp_path / "r.tsv"
    assert certify(str(trained_checkpoint), "--out", str(out), *CERTIFY) == 0
    assert certify(str(trained_checkpoint), "--out", str(out), "--compile", *CERTIFY) == 2
    assert "was written with different compile (was None, now True)" in capsys.readouterr().err


def test_a_run_whose_compilation_fails_is_an_eager_run(trained_checkpoint, tmp_path,
                                                       failing_compile):
    out, plain = tmp_path / "fallback.tsv", tmp_path / "eager.tsv"
    with pytest.warns(RuntimeWarning, match="runs eager") as caught:
        assert certify(str(trained_checkpoint), "--out", str(out), "--compile", *CERTIFY) == 0
    assert len(caught) == 1
    assert certify(str(trained_checkpoint), "--out", str(plain), *CERTIFY) == 0
    assert read(out).compile is None and read(out).run == read(plain).run
    assert verify(out) == (3, [])


def test_help_lists_compile_and_procs(capsys):
    with pytest.raises(SystemExit):
        main(["certify", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--compile torch.compile the model" in text
    assert "--procs {auto,N} N single-thread processes" in text


@pytest.mark.parametrize("value", ["0", "-1", "two", "1025"])
def test_procs_out_of_range_is_refused(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["certify", "c.pt", "--out", str(tmp_path / "r.tsv"), "--procs", value])
    assert exit_.value.code == 2
    assert f"--procs: expected 'auto' or a number of processes from 1 to 1024, got '{value}'" \
        in capsys.readouterr().err


def test_compile_takes_no_value(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["certify", "c.pt", "--out", str(tmp_path / "r.tsv"), "--compile=yes"])
    assert "--compile: ignored explicit argument 'yes'" in capsys.readouterr().err


def test_procs_must_match_the_torchrun_that_started_the_process(trained_checkpoint, tmp_path,
                                                                 capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = certify(str(trained_checkpoint), "--out", str(tmp_path / "r.tsv"), "--procs", "3")
    assert code == 2
    assert "procs: this process is one of 2 that torchrun started (WORLD_SIZE), but --procs " \
        "asks for 3: drop --procs under torchrun" in capsys.readouterr().err
    assert not (tmp_path / "r.tsv").exists()


# Real compilation ---------------------------------------------------------------------------


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_inductor_counts_agree_with_eager():
    torch.manual_seed(0)
    model = TinyNet().eval()
    x = torch.rand(1, 8, 8)
    compiled = NoiseSampler(model, 3, 0.5, compile=True)
    found = counts(compiled, x, 300, 128)  # two full batches and a padded one
    assert compiled.compiled is True
    assert found.sum() == 300
    assert found.tolist() == counts(NoiseSampler(model, 3, 0.5), x, 300, 128).tolist()


@pytest.mark.slow  # compiling the LeNet: 10 to 30 s on 2 shared cores
@pytest.mark.parametrize("amp, recorded", [("none", True), ("bf16", "bf16 weights")])
def test_an_inductor_compiled_certificate_verifies(trained_checkpoint, tmp_path, amp, recorded):
    out = tmp_path / "compiled.tsv"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback to eager
        assert certify(str(trained_checkpoint), "--out", str(out), "--compile", "--amp", amp,
                       *CERTIFY) == 0
    assert read(out).compile == recorded
    assert verify(out) == (3, [])


# --procs -------------------------------------------------------------------------------------


@pytest.mark.slow  # launches torchrun: two processes that import torch, 15 to 25 s
def test_two_processes_certify_the_rows_of_one(trained_checkpoint, tmp_path, capsys):
    args = [str(trained_checkpoint), "--n0", "10", "--n", "100", "--batch", "50", "--max", "6",
            "--device", "cpu"]
    assert certify(*args, "--out", str(tmp_path / "one.tsv"), "--procs", "1") == 0
    assert torch.get_num_threads() == 1  # --procs 1: one single-thread process
    assert certify(*args, "--out", str(tmp_path / "two.tsv"), "--procs", "2") == 0
    assert without_time(tmp_path / "two.tsv") == without_time(tmp_path / "one.tsv")
    assert len(without_time(tmp_path / "two.tsv")) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.tsv", "one.tsv.json", "two.tsv",
                                                          "two.tsv.json"]
    assert verify(tmp_path / "two.tsv") == (6, [])
