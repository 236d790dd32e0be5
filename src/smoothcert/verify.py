"""`smoothcert verify`: every certificate of a result file recomputed from its counts and
sidecar (each protocol's row check), its row set against the protocol, its labels against the
dataset's. numpy, `stats` and `sequential` only: verifying never needs torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .labels import LabelsUnavailable, split_labels
from .lattice import SOUND_MODES
from .protocols import RowCheck, Unverifiable, protocol_for_file
from .sidecar import IDENTITY_KEYS, Sidecar, read, sidecar_path
from .table import ResultFile, read_results


def paper_mode_level(alpha: float, grid: int) -> float:
    """The provable failure probability of paper-mode T-CERTIFY: alpha + (alpha - alpha/grid)."""
    return 2 * alpha - alpha / grid


@dataclass
class Verification:
    """What `check_file` found in one result file."""

    rows: int  # rows whose certificates were recomputed
    problems: list[str] = field(default_factory=list)  # what does not match: exit 1
    notes: list[str] = field(default_factory=list)  # an unfinished run, what was not checked
    checked: list[str] = field(default_factory=list)  # beyond the certificates, for the summary


def _part_of(path: Path) -> Path | None:
    """The result file a torchrun part file (`<out>.part<rank>`) belongs to, None otherwise."""
    match = re.fullmatch(r"(.+)\.part\d+", path.name)
    return path.with_name(match.group(1)) if match and not sidecar_path(path).exists() else None


def _checked_sidecar(path: Path, table: ResultFile, out: Path) -> Sidecar:
    """The sidecar that describes `table` (`out`'s), refused unless verify can use it."""
    if not table.native:
        raise ValueError(
            f"{path}: cannot be verified: it has no selection counts (written by Cohen's "
            "certify.py, a fork, or smoothcert before the method/run columns)"
        )
    sidecar = read(out)
    if sidecar is None:
        raise ValueError(f"{path}: cannot be verified without its sidecar "
                         f"{sidecar_path(out)} (sigma, alpha and grid are recorded there)")
    missing = sidecar.lacks(*IDENTITY_KEYS, "num_classes")
    missing += sidecar.lacks_value(*protocol_for_file(table.kind, sidecar).needs)
    if missing or not sidecar.is_own:
        raise ValueError(f"{sidecar_path(out)}: not a smoothcert sidecar of this version "
                         f"(lacks {', '.join(missing) or 'format'})")
    return sidecar


def _ranges(indices: Sequence[int], skip: int) -> str:
    """Protocol indices as ranges of consecutive ones: "40–59, 80"."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][-1] + skip:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}–{r[-1]}" for r in runs)


def _protocol_count(sidecar: Sidecar, size: int | None) -> int | None:
    """How many examples the protocol selects (every skip-th from 0, at most max): from the
    dataset's size when known, else from the sidecar's protocol ("..., 20 examples")."""
    if size is not None:
        count = len(range(0, size, sidecar.skip))
        return count if sidecar.max is None else min(count, sidecar.max)
    match = re.search(r"(\d+) examples$", str(sidecar.protocol or ""))
    return int(match.group(1)) if match else None


def _check_row_set(path: Path, idx: Sequence[int], sidecar: Sidecar, size: int | None,
                   part_of: Path | None, report: Verification) -> None:
    """The rows' indices against the protocol's: none outside it, none deleted; rows missing
    only after the last one present are an unfinished run."""
    skip, count = sidecar.skip, _protocol_count(sidecar, size)
    report.checked.append("no duplicates")  # read_results refuses a repeated idx
    if count is None:
        report.notes.append(f"{path}: row set not checked: the dataset's size is unknown "
                            "(labels not read) and the sidecar's protocol gives no count")
        return
    where = f"idx 0..{(count - 1) * skip} step {skip}"
    present = set(idx)
    outside = sorted(i for i in present if i % skip or i >= count * skip)
    if outside:
        report.problems.append(f"{path}: idx {_ranges(outside, 1)} not in the protocol "
                               f"({where}, {count} examples)")
    if part_of is not None:
        report.notes.append(f"{path}: a torchrun part file holds one process's rows: the row "
                            f"set is checked on {part_of} once the same certify command "
                            "merged the parts")
        report.checked.append(f"indices within the protocol ({where})")
        return
    missing = [i for i in range(0, count * skip, skip) if i not in present]
    last = max(present, default=-1)
    parts = sorted(p.name for p in path.parent.iterdir()
                   if re.fullmatch(re.escape(path.name) + r"\.part\d+", p.name))
    deleted = [] if parts else [i for i in missing if i < last]
    unfinished = missing if parts else [i for i in missing if i > last]
    if deleted:
        report.problems.append(
            f"{path}: rows missing: {_ranges(deleted, skip)} ({len(deleted)} rows) while later "
            "rows are present: rows were deleted; run the same certify command to recompute them")
    if unfinished:
        held = f" (torchrun part files beside it: {', '.join(parts)})" * bool(parts)
        report.notes.append(
            f"{path}: rows missing: {_ranges(unfinished, skip)} ({len(unfinished)} rows): an "
            f"unfinished run{held}; run the same certify command to resume")
    report.checked.append(f"row set complete ({where})" if not missing else
                          f"row set: {count - len(missing)} of {count} rows ({where})")


def _label_problem(label: int, i: int, labels: np.ndarray | None, source: str) -> list[str]:
    if labels is None or i >= len(labels) or labels[i] == label:
        return []
    return [f"label {label}, but {source} labels example {i} as {int(labels[i])}"]


def _dataset_labels(path: Path, sidecar: Sidecar, data_dir: str | os.PathLike | None,
                    data_file: str | os.PathLike | None,
                    report: Verification) -> tuple[np.ndarray | None, str]:
    """The labels of the sidecar's dataset split, or None with a note saying why not."""
    try:
        labels, source = split_labels(sidecar.dataset, sidecar.split, data_dir, data_file)
    except LabelsUnavailable as err:
        report.notes.append(f"{path}: labels not checked: {err}")
        return None, ""
    report.checked.append(f"labels checked against {source}")
    return labels, source


def check_file(path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
               data_file: str | os.PathLike | None = None) -> Verification:
    """Verify a result file: recompute every certificate from its counts and sidecar (as its
    protocol's row check says), check its row set against the protocol and each row's label
    against the dataset (read from `data_dir`, an npz dataset from `data_file`; MNIST's
    shipped copy without).

    A torchrun part file `<out>.part<rank>` is checked with out's sidecar.
    """
    path = Path(path)
    table = read_results(path, kind="certify")
    part_of = _part_of(path)
    sidecar = _checked_sidecar(path, table, part_of or path)
    run = sidecar.fingerprint()
    report = Verification(len(table.lines))
    if sidecar.run != run:
        report.problems.append(f"{sidecar_path(part_of or path)}: records run "
                               f"{sidecar.run}, but its settings give {run} (edited?)")
    check = _row_check(path, table, sidecar, report)
    _check_sound(path, sidecar, report)
    labels, source = _dataset_labels(path, sidecar, data_dir, data_file, report)
    _check_row_set(path, table.values["idx"], sidecar, None if labels is None else len(labels),
                   part_of, report)
    for i, lineno in enumerate(table.line_numbers):
        value = {name: column[i] for name, column in table.values.items()}
        found = check(value) + _label_problem(value["label"], value["idx"], labels, source)
        if found:
            report.problems.append(f"{path}, line {lineno} (idx {value['idx']}): "
                                   + "; ".join(found))
    return report


def _check_sound(path: Path, sidecar: Sidecar, report: Verification) -> None:
    """Sound sampling changes the noise, not the certificate (docs/statistics.md): the rows
    are recomputed alike; the sidecar says which sampling they rest on."""
    if sidecar.sound is None:
        return
    if sidecar.sound not in SOUND_MODES:
        report.problems.append(f"{path}: sidecar's sound {sidecar.sound!r} is none of "
                               f"{', '.join(SOUND_MODES)}")
        return
    report.checked.append(f"sound sampling ({sidecar.sound}): radii against perturbations on "
                          "the 8-bit lattice")


def _row_check(path: Path, table: ResultFile, sidecar: Sidecar,
               report: Verification) -> RowCheck:
    """The protocol's check of a row; where none can be checked, a problem and a note each."""
    try:
        return protocol_for_file(table.kind, sidecar).row_check(sidecar, table.header,
                                                              table.methods)
    except Unverifiable as err:
        report.problems.append(f"{path}: {err}")
        note = err.row_note
        return lambda _value: [note]


def verify(path: str | os.PathLike, data_dir: str | os.PathLike | None = None,
           data_file: str | os.PathLike | None = None) -> tuple[int, list[str]]:
    """`check_file`'s rows recomputed and problems (its notes left out)."""
    report = check_file(path, data_dir, data_file)
    return report.rows, report.problems
