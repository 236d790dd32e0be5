"""Runs under torchrun (2 processes, gloo on the CPU) compute what one process computes.

Every multi-process run here launches the real thing: torch.distributed.run (torchrun) starting
`python -m smoothcert ...` workers. The one-process references run in this process through the
same CLI, with one thread like the workers.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import smoothcert
from smoothcert.cli import build_parser
from smoothcert.cli import main as cli_main
from smoothcert.io import read_checkpoint_state
from smoothcert.presets import TrainConfig
from smoothcert.results import verify
from smoothcert.runner import RunConfig, Runner
from smoothcert.train import train

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed gloo"
)

# Each torchrun launch starts two processes that import torch: 14 to 22 s on 2 shared cores.
launches_torchrun = pytest.mark.slow
TIMEOUT = 180  # seconds for one torchrun launch; a hung rank fails the test instead of the suite
TRAIN = ["--train-subset", "256", "--batch", "64", "--k", "2", "--epochs", "1", "--eval-subset",
         "0"]
CERTIFY = ["--n0", "10", "--N", "100", "--max-examples", "10", "--batch", "100"]
TIME = 5  # the time column of a result row: the one column that differs between runs
# The launcher's environment must not leak into the runs (pytest itself under torchrun).
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
               "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")



def launch_command(args: list[str], nproc: int = 2, script: Path | None = None) -> list[str]:
    # --standalone: a c10d rendezvous on localhost whose port the OS picks when binding it, so
    # no two launches (or other programs) race for a port chosen in advance.
    program = [str(script)] if script else ["-m", "smoothcert"]
    launcher = ["--nproc_per_node", str(nproc), "--standalone", *program]
    return [sys.executable, "-m", "torch.distributed.run", *launcher, "--no-progress", *args]


def start_torchrun(args: list[str], cwd: Path, log: Path | None = None,
                   script: Path | None = None) -> subprocess.Popen:
    """torchrun `smoothcert *args` (or `script *args`) with this checkout's smoothcert."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env["OMP_NUM_THREADS"] = "1"
    source = str(Path(smoothcert.__file__).resolve().parents[1])  # the workers run in `cwd`
    env["PYTHONPATH"] = os.pathsep.join(p for p in (source, env.get("PYTHONPATH")) if p)
    output = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115
    return subprocess.Popen(launch_command(args, script=script), cwd=cwd, env=env,
                            stdout=output, stderr=subprocess.STDOUT, text=True)


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the workers of a torchrun agent), from /proc."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def stop(proc: subprocess.Popen) -> None:
    """End a torchrun launch and its workers (which run in sessions of their own)."""
    workers = children(proc.pid) if Path("/proc").is_dir() else []
    proc.terminate()  # torchrun passes SIGTERM on to its workers and waits for them
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def launch(args: list[str], cwd: Path) -> tuple[int, str]:
    """Run `smoothcert *args` on 2 processes: the exit status and the output."""
    proc = start_torchrun(args, cwd)
    try:
        output, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        stop(proc)
        pytest.fail(f"torchrun {' '.join(args)} did not finish in {TIMEOUT} s")
    return proc.returncode, output


def torchrun(args: list[str], cwd: Path) -> str:
    """Run `smoothcert *args` on 2 processes; its output; fail on a non-zero exit."""
    status, output = launch(args, cwd)
    assert status == 0, f"torchrun {' '.join(args)} failed:\n{output}"
    return output


@contextlib.contextmanager
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def in_process(args: list[str]) -> None:
    """`smoothcert *args` in one process (this one), with one thread like each worker."""
    with one_thread():
        assert cli_main(["--no-progress", *args]) == 0


def assert_same_weights(a: Path, b: Path, atol: float = 1e-5) -> None:
    # The gradient all-reduce averages per-rank means: the same sum in another order.
    state_a, state_b = read_checkpoint_state(a), read_checkpoint_state(b)
    assert state_a["epoch"] == state_b["epoch"]
    assert state_a["model"].keys() == state_b["model"].keys()
    for name, tensor in state_a["model"].items():
        torch.testing.assert_close(state_b["model"][name], tensor, rtol=0, atol=atol, msg=name)


def log_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def without_time(path: Path) -> list[list[str]]:
    """The header and rows of a result file, each without its time column."""
    fields = [line.split("\t") for line in path.read_text().splitlines()]
    return [f[:TIME] + f[TIME + 1:] for f in fields]


def lines_by_index(path: Path) -> dict[int, str]:
    """The complete rows of a result file (not a last one cut off mid-write), by index."""
    lines = path.read_text().split("\n")[1:-1]
    return {int(line.split("\t")[0]): line for line in lines}


def part_files(out: Path) -> list[Path]:
    return sorted(out.parent.glob(out.name + ".part*"))


# Training ------------------------------------------------------------------------------------

METHODS = {"gaussian": ["--objective", "gaussian"], "adre": ["--objective", "adre", "--lam", "0.2"]}


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory):
    """Run directories of 2-process trainings, by method, each trained once for the module."""
    folder = tmp_path_factory.mktemp("ddp")
    runs: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in runs:
            torchrun(["train", *TRAIN, *METHODS[method], "--out", "two"], folder / method)
            runs[method] = folder / method / "two"
        return runs[method]

    for method in METHODS:
        (folder / method).mkdir()
    return get


@launches_torchrun
@pytest.mark.parametrize("method", sorted(METHODS))
def test_two_processes_train_the_weights_of_one(two_process_runs, tmp_path, method):
    two = two_process_runs(method)
    in_process(["train", *TRAIN, *METHODS[method], "--out", str(tmp_path / "one")])
    assert_same_weights(tmp_path / "one" / "checkpoint.pt", two / "checkpoint.pt")
    # Rank 0 alone writes: one log line per epoch, no stray files.
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.pt", "config.json", "log.jsonl"]
    (one_record,), (two_record,) = log_records(tmp_path / "one"), log_records(two)
    assert two_record["batches"] == one_record["batches"] == 256 // 64
    # The logged training metrics are global-batch means, as with one process.
    for key in ("loss", "l_per", "train_acc", *(["l_adre"] if method == "adre" else [])):
        assert two_record[key] == pytest.approx(one_record[key], rel=1e-5, abs=1e-6), key


@launches_torchrun
def test_torchrun_resume_continues_like_an_uninterrupted_run(two_process_runs, tmp_path):
    shutil.copytree(two_process_runs("gaussian"), tmp_path / "two")
    args = [*TRAIN, "--objective", "gaussian"]
    torchrun(["train", *args, "--resume", "--epochs", "2", "--out", "two"], tmp_path)
    in_process(["train", *args, "--epochs", "2", "--out", str(tmp_path / "one")])
    assert_same_weights(tmp_path / "one" / "checkpoint.pt", tmp_path / "two" / "checkpoint.pt")
    assert [r["epoch"] for r in log_records(tmp_path / "two")] == [0, 1]


@launches_torchrun
def test_a_batch_the_processes_cannot_share_is_refused_before_any_file(tmp_path):
    status, output = launch(["train", *TRAIN, "--batch", "63", "--out", "run"], tmp_path)
    assert status != 0
    assert "batch (the global batch) must be divisible by the number of processes (2), got 63; " \
        "e.g. 62 or 64" in output
    assert not (tmp_path / "run").exists()


# Certification -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("model")
    with one_thread():
        return train(TrainConfig(train_subset=256, batch=64, epochs=1, eval_subset=0,
                                 out=str(out)), progress=False)


@pytest.fixture(scope="module")
def reference(checkpoint, tmp_path_factory) -> Path:
    """The one-process result file of CERTIFY."""
    out = tmp_path_factory.mktemp("reference") / "one.tsv"
    in_process(["certify", str(checkpoint), "--out", str(out), *CERTIFY])
    return out


@launches_torchrun
def test_two_processes_certify_the_rows_of_one(checkpoint, reference, tmp_path):
    torchrun(["certify", str(checkpoint), "--out", "two.tsv", *CERTIFY], tmp_path)
    assert without_time(tmp_path / "two.tsv") == without_time(reference)
    assert len(lines_by_index(reference)) == 10
    assert part_files(tmp_path / "two.tsv") == []


@launches_torchrun
def test_rerun_finishes_the_parts_of_an_interrupted_run(checkpoint, reference, tmp_path):
    """Part files as a killed run leaves them: complete rows, a row cut off mid-write, the part
    of a rank the new run does not have (an earlier run with 4 processes) and no merged file."""
    out = tmp_path / "two.tsv"
    shutil.copy(reference.with_name(reference.name + ".json"), out.with_name(out.name + ".json"))
    header, *_ = reference.read_text().splitlines(keepends=True)
    rows = lines_by_index(reference)
    planted = {1: "part1", 3: "part1", 0: "part0", 7: "part3"}
    for idx, suffix in planted.items():
        part = out.with_name(f"{out.name}.{suffix}")
        if not part.exists():
            part.write_text(header)
        with open(part, "a") as f:
            f.write(rows[idx] + "\n")
    with open(out.with_name(out.name + ".part1"), "a") as f:
        f.write(rows[5][: len(rows[5]) // 2])  # killed mid-write: no newline
    torchrun(["certify", str(checkpoint), "--out", out.name, *CERTIFY], tmp_path)

    assert without_time(out) == without_time(reference)  # each index once, in order
    kept = lines_by_index(out)
    for idx in planted:  # finished rows are kept (their time too), not certified again
        assert kept[idx] == rows[idx]
    assert part_files(out) == []


def test_parts_of_a_run_with_other_settings_are_refused(checkpoint, reference, tmp_path):
    out = tmp_path / "two.tsv"
    shutil.copy(reference.with_name(reference.name + ".json"), out.with_name(out.name + ".json"))
    header, first, *_ = reference.read_text().splitlines(keepends=True)
    out.with_name(out.name + ".part1").write_text(header + first)
    cfg = RunConfig(checkpoint=str(checkpoint), out=str(out), n0=10, n=200, max=10, batch=100)
    with pytest.raises(ValueError, match="different n"):
        Runner(cfg, progress=False).run()


def test_one_process_merges_the_parts_of_a_two_process_run(checkpoint, reference, tmp_path):
    out = tmp_path / "one.tsv"
    header, *rows = reference.read_text().splitlines(keepends=True)
    out.with_name(out.name + ".part0").write_text(header + "".join(rows[0:6:2]))
    out.with_name(out.name + ".part1").write_text(header + "".join(rows[1:6:2]) + rows[7][:9])
    in_process(["certify", str(checkpoint), "--out", str(out), *CERTIFY])
    assert without_time(out) == without_time(reference)
    assert part_files(out) == []


SEQUENTIAL = {"radii": ["--radii", "0,0.25,0.5", "--max-n", "1000", "--method", "tcertify"],
              "adaptive-n": ["--adaptive-n", "--max-n", "1000", "--tolerance", "0.05"]}


@launches_torchrun
@pytest.mark.parametrize("mode", sorted(SEQUENTIAL))
def test_two_processes_certify_sequentially_the_rows_of_one(checkpoint, tmp_path, mode):
    args = ["--n0", "10", "--max-examples", "10", "--batch", "100", *SEQUENTIAL[mode]]
    in_process(["certify", str(checkpoint), "--out", str(tmp_path / "one.tsv"), *args])
    torchrun(["certify", str(checkpoint), "--out", "two.tsv", *args], tmp_path)
    assert without_time(tmp_path / "two.tsv") == without_time(tmp_path / "one.tsv")
    assert len(lines_by_index(tmp_path / "two.tsv")) == 10
    assert part_files(tmp_path / "two.tsv") == []
    assert verify(tmp_path / "two.tsv") == (10, [])


KILLED = ["--n0", "10", "--N", "100", "--max-examples", "12", "--batch", "100"]
# A worker that is rank 1 kills itself (SIGKILL) after writing two rows: a rank dies mid-run at
# the same point every time, however fast or slow the machine.
RANK_1_DIES = """
import os, signal, sys
from smoothcert.cli import main
from smoothcert.runner import Runner
original, rows = Runner._row, []
def row(self, idx):
    if os.environ["RANK"] == "1" and len(rows) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    rows.append(idx)
    return original(self, idx)
Runner._row = row
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_killing_a_rank_mid_run_then_rerunning_completes_without_duplicates(checkpoint, tmp_path):
    out = tmp_path / "two.tsv"
    args = ["certify", str(checkpoint), "--out", out.name, *KILLED]
    script = tmp_path / "rank_1_dies.py"
    script.write_text(RANK_1_DIES)
    proc = start_torchrun(args, tmp_path, log=tmp_path / "killed.log", script=script)
    try:
        assert proc.wait(timeout=TIMEOUT) != 0  # rank 1 died; torchrun ended rank 0
    finally:
        if proc.poll() is None:
            stop(proc)
    finished = {}
    for path in [out, *part_files(out)]:
        if path.exists():
            finished.update(lines_by_index(path))
    rank_1 = [idx for idx in finished if idx % 2 == 1]  # rank 1 had examples 1, 3, 5, ...
    assert rank_1 == [1, 3], (tmp_path / "killed.log").read_text()
    assert len(finished) < 12

    torchrun(args, tmp_path)
    expected = tmp_path / "one.tsv"
    in_process(["certify", str(checkpoint), "--out", str(expected), *KILLED])
    assert without_time(out) == without_time(expected)
    assert all(lines_by_index(out)[idx] == line for idx, line in finished.items())
    assert part_files(out) == []


# The command line under torchrun ----------------------------------------------------------------


def test_every_option_has_a_spelling_that_torchrun_passes_to_the_workers():
    from torch.distributed.run import get_args_parser

    def passes(option: str) -> bool:
        argv = ["--nproc_per_node", "2", "-m", "smoothcert", "certify", option, "1"]
        with contextlib.redirect_stderr(io.StringIO()), contextlib.suppress(SystemExit):
            return option in get_args_parser().parse_args(argv).training_script_args
        return False

    commands = build_parser()._subparsers._group_actions[0].choices
    # An old spelling kept as a hidden alias is an action of its own with the option's dest.
    spellings: dict[tuple[str, str], list[str]] = {}
    for name, command in commands.items():
        for action in command._actions:
            spellings.setdefault((name, action.dest), []).extend(action.option_strings)
    blocked = sorted(
        f"{name} {'/'.join(options)}"
        for (name, _), options in spellings.items()
        if options and not any(passes(o) for o in options)
    )
    assert blocked == []
