"""The `smoothcert` command, in-process through cli.main and once through `python -m`."""

from __future__ import annotations

import gzip
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from smoothcert import train as train_module
from smoothcert.cli import build_parser, main
from smoothcert.sampling import NoiseSampler

PNG = b"\x89PNG\r\n\x1a\n"
SMALL_TRAIN = ["--epochs", "1", "--train-subset", "64", "--batch", "64", "--k", "2",
               "--eval-subset", "20", "--device", "cpu"]
SMALL_CERTIFY = ["--n0", "10", "--n", "100", "--batch", "100", "--device", "cpu"]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `smoothcert argv` (argparse's own exits included)."""
    try:
        code = main(["--no-progress", *argv])
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def result_file(trained_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "res.tsv"
    code = main(["--no-progress", "certify", str(trained_checkpoint), "--out", str(out),
                 "--max", "4", *SMALL_CERTIFY])
    assert code == 0
    return out


# ---------------------------------------------------------------- entry point


def test_python_dash_m_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "smoothcert", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("train", "certify", "predict", "analyze", "demo"):
        assert command in done.stdout


def test_a_usage_error_in_a_subprocess_exits_2_without_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "smoothcert", "train", "--sigma", "0", "--out", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2
    assert "sigma" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------- train


def test_train_with_a_preset_and_overrides(capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, _ = cli(capsys, "train", "--preset", "mnist-lenet", "--objective", "adre",
                          "--lam", "0.1", "--sigma", "0.5", "--out", str(out), *SMALL_TRAIN)
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
    assert str(out / "checkpoint.pt") in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] == "mnist-lenet"
    assert (config["lr"], config["lr_step"]) == (0.05, 8)  # from the preset
    assert (config["batch"], config["k"], config["objective"], config["lam"]) == (
        64, 2, "adre", 0.1)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0] and "test_noisy_acc" in log[0]

    # Again without --resume: refused; with --resume and more epochs: continued.
    again = ["train", "--preset", "mnist-lenet", "--objective", "adre", "--lam", "0.1", "--sigma",
             "0.5", "--out", str(out), *SMALL_TRAIN]
    code, _, stderr = cli(capsys, *again)
    assert code == 2 and "--resume" in stderr
    code, _, _ = cli(capsys, *again, "--resume", "--epochs", "2")
    assert code == 0
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    code, _, stderr = cli(capsys, *again, "--resume", "--epochs", "3", "--sigma", "0.25")
    assert code == 2 and "sigma" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("before", ["nothing", "a run stopped before its first checkpoint"])
def test_train_resume_without_a_checkpoint_is_refused(capsys, tmp_path, before):
    out = tmp_path / "run"
    if before != "nothing":
        out.mkdir()
        (out / "config.json").write_text('{"dataset": "mnist", "model": "lenet", "sigma": 0.5, '
                                         '"epochs": 1, "seed": 0, "out": "run"}')
    files = sorted(tmp_path.rglob("*"))
    code, _, stderr = cli(capsys, "train", "--out", str(out), *SMALL_TRAIN, "--resume")
    assert code == 2 and "Traceback" not in stderr
    assert stderr == (f"smoothcert train: error: resume: '{out}' holds no checkpoint.pt to "
                      "continue; drop --resume to start a new run there, or give --out the "
                      "folder of the run to continue\n")
    assert sorted(tmp_path.rglob("*")) == files  # nothing written


@pytest.mark.parametrize(
    "args, name",
    [
        (["--lam", "-1"], "error: lam must be"),
        (["--objective", "foo"], "argument --objective: invalid choice"),
        (["--sigma", "0"], "error: sigma must be"),
        (["--k", "0"], "error: k must be"),
        (["--k", "abc"], "argument --k: invalid int value"),  # argparse's own check
        (["--batch", "0"], "error: batch must be"),
        (["--objective", "smoothadv"], "error: eps must be > 0"),  # eps defaults to 0
        (["--eps", "-0.5"], "error: eps must be"),
        (["--steps", "0"], "error: steps must be"),
        (["--model", "vgg"], "error: model must be one of"),  # or a spec (issue 23)
        (["--preset", "nope"], "argument --preset: invalid choice"),
        (["--lam", "0.2"], "error: lam is read by objective adre, adreadv and consistency only"),
        (["--device", "meta"], "error: device must be 'auto', 'cpu', 'cuda'"),
        (["--device", "tpu"], "error: device must be 'auto', 'cpu', 'cuda'"),
    ],
)
def test_bad_train_options_exit_2_naming_the_argument(capsys, tmp_path, args, name):
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, "train", "--out", str(out), *args)
    assert code == 2
    assert name in stderr
    assert "Traceback" not in stderr
    assert not out.exists()


def test_missing_cifar10_exits_2_with_a_clear_message(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, "train", "--dataset", "cifar10", "--model", "cifar_resnet20",
                          "--data-dir", "/nonexistent", "--out", str(out))
    assert code == 2
    assert "CIFAR-10" in stderr and "not found" in stderr
    assert "/nonexistent" in stderr and "--data-dir" in stderr
    assert "Traceback" not in stderr
    assert not (out / "config.json").exists()  # nothing half-made left behind


@pytest.mark.parametrize(
    "available, count, device, message",
    [(False, 0, "cuda", "no CUDA device is available"),
     (True, 1, "cuda:3", "this machine has 1 CUDA device(s), cuda:0 to cuda:0")],
)
def test_a_missing_gpu_exits_2(capsys, monkeypatch, tmp_path, available, count, device,
                               message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    out = tmp_path / "run"
    code, _, stderr = cli(capsys, "train", "--out", str(out), "--device", device)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


def test_a_batch_too_large_for_memory_exits_2_naming_a_smaller_one(capsys, tmp_path):
    # 2**30 noisy copies of each of 64 images need 215 PB: the allocation fails at once.
    code, _, stderr = cli(capsys, "train", "--out", str(tmp_path / "run"), "--epochs", "1",
                          "--train-subset", "64", "--batch", "64", "--k", str(2**30),
                          "--eval-subset", "0", "--device", "cpu")
    assert code == 2
    assert "error: batch: a batch of 64 does not fit in memory" in stderr
    assert "try --batch 32 or smaller" in stderr and "Traceback" not in stderr


def test_a_certify_batch_too_large_for_memory_exits_2_naming_a_smaller_one(
        capsys, monkeypatch, tmp_path, trained_checkpoint):
    # --N is at most 10^7, so each noisy image is made 2**40 pixels: a buffer of 10,000 of
    # them needs 44 PB, and the allocation fails at once.
    monkeypatch.setattr(NoiseSampler, "_noise_buffer", staticmethod(
        lambda x, size, device: torch.empty((size, 2**40), device=device)))
    code, _, stderr = cli(capsys, "certify", str(trained_checkpoint), "--out",
                          str(tmp_path / "r.tsv"), "--max-examples", "1", "--N", "10000",
                          "--batch", "10000")
    assert code == 2 and "Traceback" not in stderr
    assert "error: batch: a batch of 10000 does not fit in memory" in stderr
    assert "try --batch 5000 or smaller" in stderr


@pytest.mark.parametrize("command", ["train", "certify"])
def test_a_truncated_dataset_file_exits_2_naming_it(capsys, tmp_path, trained_checkpoint,
                                                    command):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shipped = Path(train_module.__file__).parent / "_data" / "MNIST" / "raw"
    for name in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (raw / name).write_bytes((shipped / name).read_bytes())
    for name in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (raw / name).write_bytes(gzip.compress(b"\x00\x00\x08\x03")[:-4])  # cut short
    args = (["train", "--out", str(tmp_path / "run"), *SMALL_TRAIN] if command == "train"
            else ["certify", str(trained_checkpoint), "--out", str(tmp_path / "r.tsv"),
                  *SMALL_CERTIFY])
    code, _, stderr = cli(capsys, *args, "--data-dir", str(tmp_path / "data"))
    assert code == 2 and "Traceback" not in stderr
    assert "truncated or not a gzip file" in stderr and str(raw) in stderr


# ---------------------------------------------------------------- errors, --debug and logging


def _torch_value_error(*args, **kwargs):
    """A bug as torch reports it: a ValueError raised inside torch, not by smoothcert's checks."""
    F.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))


def test_a_bug_shows_its_traceback_instead_of_a_usage_error(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(train_module.Trainer, "fit", _torch_value_error)
    with pytest.raises(ValueError, match="batch_size"):
        main(["--no-progress", "train", "--out", str(tmp_path / "run"), *SMALL_TRAIN])
    monkeypatch.setattr(train_module.Trainer, "fit", lambda self: {}["no such key"])
    with pytest.raises(KeyError):
        main(["--no-progress", "train", "--out", str(tmp_path / "run2"), *SMALL_TRAIN])


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_the_traceback_of_a_usage_error(tmp_path, where):
    args = ["train", "--sigma", "0", "--out", str(tmp_path / "r")]
    argv = ["--debug", *args] if where == "before" else [*args, "--debug"]
    with pytest.raises(ValueError, match="sigma must be"):
        main(argv)


def test_the_sigterm_handler_is_the_commands_only(capsys):
    before = signal.getsignal(signal.SIGTERM)
    code, _, _ = cli(capsys, "presets")
    assert code == 0 and signal.getsignal(signal.SIGTERM) is before


def test_library_messages_are_logged_to_stderr(capsys, tmp_path):
    out = tmp_path / "run"
    code, _, _ = cli(capsys, "train", "--out", str(out), *SMALL_TRAIN)
    assert code == 0
    code, stdout, stderr = cli(capsys, "train", "--out", str(out), *SMALL_TRAIN, "--resume",
                               "--epochs", "2")
    assert code == 0
    assert f"resuming '{out}' after epoch 1 of 2" in stderr and "resuming" not in stdout


# ---------------------------------------------------------------- certify, predict, analyze


def test_certify_writes_results_and_resumes(capsys, trained_checkpoint, result_file, tmp_path):
    lines = result_file.read_text().splitlines()
    assert lines[0].startswith("idx\tlabel\tpredict\tradius\tcorrect\ttime\tmethod\trun\t")
    assert [line.split("\t")[0] for line in lines[1:]] == ["0", "1", "2", "3"]
    before = result_file.read_text()
    code, stdout, _ = cli(capsys, "certify", str(trained_checkpoint), "--out", str(result_file),
                          "--max", "4", *SMALL_CERTIFY)
    assert code == 0 and str(result_file) in stdout
    assert result_file.read_text() == before  # finished: nothing recomputed
    copy = tmp_path / result_file.name  # other settings on a copy of the shared file
    for suffix in ("", ".json"):
        shutil.copy(f"{result_file}{suffix}", f"{copy}{suffix}")
    other = ["certify", str(trained_checkpoint), "--out", str(copy), "--max", "4", "--n0", "10",
             "--n", "50", "--batch", "50", "--device", "cpu"]
    code, _, stderr = cli(capsys, *other)
    assert code == 2 and "different n" in stderr and "--restart-stale" in stderr
    assert copy.read_text() == before
    code, _, _ = cli(capsys, *other, "--restart-stale")
    assert code == 0 and copy.read_text() != before
    code, _, stderr = cli(capsys, "verify", str(copy))
    assert code == 0 and "every certificate matches" in stderr


def test_predict_prints_the_abstention_rate(capsys, trained_checkpoint, tmp_path):
    out = tmp_path / "pred.tsv"
    code, stdout, _ = cli(capsys, "predict", str(trained_checkpoint), "--out", str(out),
                          "--max", "3", "--n", "5", "--batch", "5", "--device", "cpu")
    assert code == 0
    assert "abstention rate: 1.0000" in stdout  # 5 votes can never reject at alpha 0.001
    header, *rows = (line.split("\t") for line in out.read_text().splitlines())
    assert header == ["idx", "label", "predict", "correct", "time", "method", "run"]
    assert len(rows) == 3 and all(row[2:4] == ["-1", "0"] for row in rows)


def test_a_file_written_with_the_old_spellings_is_resumed_with_the_new_ones(
        capsys, trained_checkpoint, result_file, tmp_path):
    copy = tmp_path / result_file.name
    for suffix in ("", ".json"):
        shutil.copy(f"{result_file}{suffix}", f"{copy}{suffix}")
    before = copy.read_text()
    code, _, stderr = cli(capsys, "certify", str(trained_checkpoint), "--out", str(copy),
                          "--max-examples", "4", "--n0", "10", "--N", "100", "--batch", "100",
                          "--device", "cpu", "--layout", "both", "--checkpoint-format", "auto",
                          "--amp", "none")
    assert code == 0, stderr
    assert copy.read_text() == before  # the same run: finished, nothing recomputed


@pytest.mark.parametrize(
    "args, message",
    [(["--n", "0"], "argument --n: must be an integer in [1, "),
     (["--alpha", "2"], "error: alpha must be"),
     (["--method", "foo"], "argument --method: invalid choice"),
     (["--sigma", "-1"], "argument --sigma: must be a positive finite number"),
     (["--max-examples", "-5"], "argument --max-examples: must be a count >= 0"),
     (["--max", "two"], "argument --max: expected a count of examples")],
)
def test_bad_certify_options_exit_2(capsys, trained_checkpoint, tmp_path, args, message):
    out = tmp_path / "x.tsv"
    code, _, stderr = cli(capsys, "certify", str(trained_checkpoint), "--out", str(out), *args)
    assert code == 2 and message in stderr and "Traceback" not in stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["certify", "predict", "train"])
def test_an_unknown_dataset_is_an_argparse_error_naming_the_choices(capsys, tmp_path, command):
    out = tmp_path / "x"
    where = ["ckpt.pt"] if command != "train" else []
    code, _, stderr = cli(capsys, command, *where, "--out", str(out), "--dataset", "bogus")
    assert code == 2 and "Traceback" not in stderr
    assert f"smoothcert {command}: error: argument --dataset: invalid choice: 'bogus' " \
           "(choose from 'mnist', 'cifar10', 'imagenet', 'imagefolder', 'npz')" in stderr
    assert not out.exists()


def test_certify_accepts_every_dataset_name():
    for name in ("mnist", "cifar10", "imagenet"):
        args = build_parser(["certify"]).parse_args(["certify", "c.pt", "--out", "o",
                                                      "--dataset", name])
        assert args.dataset == name


def test_certify_with_a_bad_checkpoint_exits_2(capsys, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"PK\x03\x04 not really a zip")
    foreign = tmp_path / "foreign.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"lr": 0.1}}, foreign)
    for path in (tmp_path / "missing.pt", broken, foreign):
        code, _, stderr = cli(capsys, "certify", str(path), "--out", str(tmp_path / "o.tsv"))
        assert code == 2
        assert "checkpoint" in stderr and str(path) in stderr and "Traceback" not in stderr


def test_analyze_prints_a_markdown_table_with_acr(capsys, result_file):
    code, stdout, _ = cli(capsys, "analyze", str(result_file))
    assert code == 0
    assert "ACR" in stdout
    assert "| res: CERTIFY |" in stdout and "| res: T-CERTIFY (paper mode) |" in stdout
    assert "| res: T-CERTIFY (strict) |" in stdout
    assert "4 examples" in stdout  # the protocol note from the sidecar


def test_analyze_latex_and_csv(capsys, result_file):
    code, stdout, _ = cli(capsys, "analyze", "--latex", str(result_file))
    assert code == 0
    assert r"\begin{tabular}" in stdout and "ACR" in stdout and r"\bottomrule" in stdout
    code, stdout, _ = cli(capsys, "analyze", "--csv", str(result_file))
    assert code == 0
    rows = stdout.rstrip("\n").splitlines()
    assert rows[0].startswith("method,0.0,0.25,") and rows[0].endswith(",ACR,n")
    assert rows[1].startswith("res: CERTIFY,") and len(rows) == 4
    code, _, stderr = cli(capsys, "analyze", "--csv", "--latex", str(result_file))
    assert code == 2 and "not allowed" in stderr


def test_analyze_plot_writes_a_png(capsys, result_file, tmp_path):
    plot = tmp_path / "x.png"
    code, stdout, stderr = cli(capsys, "analyze", str(result_file), "--plot", str(plot))
    assert code == 0 and "ACR" in stdout and str(plot) in stderr
    assert plot.read_bytes().startswith(PNG)


def test_analyze_of_a_missing_file_exits_2(capsys, tmp_path):
    code, _, stderr = cli(capsys, "analyze", str(tmp_path / "none.tsv"))
    assert code == 2
    assert "none.tsv" in stderr and "Traceback" not in stderr


# ---------------------------------------------------------------- output paths and files


def test_train_out_that_is_a_file_exits_2_naming_it(capsys, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    code, _, stderr = cli(capsys, "train", "--out", str(file), *SMALL_TRAIN)
    assert code == 2 and "Traceback" not in stderr
    assert f"out: '{file}' is a file, but --out names a folder" in stderr
    assert file.read_text() == "mine"


def test_certify_out_that_is_a_folder_exits_2_naming_it(capsys, trained_checkpoint, tmp_path):
    code, _, stderr = cli(capsys, "certify", str(trained_checkpoint), "--out", str(tmp_path),
                          *SMALL_CERTIFY)
    assert code == 2 and "Traceback" not in stderr and "Errno" not in stderr
    assert f"out: '{tmp_path}' is a folder, but --out names a file" in stderr


def test_analyze_plot_below_a_file_exits_2_and_a_missing_folder_is_created(capsys, result_file,
                                                                           tmp_path):
    file = tmp_path / "file"
    file.write_text("mine")
    code, _, stderr = cli(capsys, "analyze", str(result_file), "--plot", str(file / "x.png"))
    assert code == 2 and "Errno" not in stderr
    assert f"plot: '{file}' is a file, so '{file / 'x.png'}' cannot be created" in stderr
    plot = tmp_path / "missing" / "x.png"
    code, _, _ = cli(capsys, "analyze", str(result_file), "--plot", str(plot))
    assert code == 0 and plot.read_bytes().startswith(PNG)


def test_analyze_of_one_file_given_twice_exits_2_naming_it(capsys, result_file, tmp_path):
    alias = tmp_path / "alias.tsv"
    alias.symlink_to(result_file)
    for twice in ([result_file, result_file], [result_file, alias]):
        code, _, stderr = cli(capsys, "analyze", *map(str, twice))
        assert code == 2 and f"analyze: '{twice[1]}' is given twice" in stderr


def test_analyze_reads_a_result_file_and_sidecar_starting_with_a_bom(capsys, result_file,
                                                                      tmp_path):
    copy = tmp_path / result_file.name
    for suffix in ("", ".json"):  # as a Windows editor saves them
        Path(f"{copy}{suffix}").write_bytes(b"\xef\xbb\xbf" + Path(f"{result_file}{suffix}")
                                            .read_bytes())
    code, stdout, stderr = cli(capsys, "analyze", str(copy))
    assert code == 0, stderr
    assert stdout == cli(capsys, "analyze", str(result_file))[1]
