"""The sidecar `<result>.json`: a run's settings, its checkpoint's sha256 and its fingerprint.

`Sidecar` is the only place its keys are named. It reads every sidecar smoothcert wrote (keys
an older version lacked stay unset, keys it does not know are kept in `extra`) and writes
what it read back unchanged, so that fingerprints never move.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .io import atomic_write_json

FORMAT = "smoothcert-results/2"
# The settings a row's `run` fingerprint covers: rows agree on these or come from another run.
IDENTITY_KEYS = ("mode", "method", "split", "n0", "n", "alpha", "grid", "skip", "seed", "sigma",
                 "dataset", "amp", "checkpoint_sha256")
# The settings of sequential ("sequential") and input-specific ("adaptive") sampling: part of
# the identity where set, so that fixed-n runs keep the fingerprints they always had.
SAMPLING_KEYS = ("sampling", "radii", "max_n", "confidence_sequence", "batch", "tolerance",
                 "final_share", "precision", "futility")
# The denoiser's content (denoised smoothing): part of the identity where set, likewise.
DENOISER_KEYS = ("denoiser_sha256",)
# A user's model and data (see sources._user_settings): part of the identity where set, so that
# runs on smoothcert's and the published checkpoints keep their fingerprints.
USER_KEYS = ("model", "model_kwargs", "normalization", "classes", "image_size")
# Sound sampling on the 8-bit lattice ("exact" or "round", smoothcert.lattice): part of the
# identity where set, so that a file never mixes sound and ordinary rows.
NOISE_KEYS = ("sound",)
# How the network ran beyond amp: compile (true: torch.compile'd, `--compile`; under amp "bf16
# weights" / "fp16 weights": compiled with its weights cast to that dtype), part of the
# identity where set, so that a file never mixes compiled and eager rows and eager runs keep
# their fingerprints.
EXECUTION_KEYS = ("compile",)
_OPTIONAL_IDENTITY = (*SAMPLING_KEYS, *DENOISER_KEYS, *USER_KEYS, *NOISE_KEYS,
                      *EXECUTION_KEYS)
_TEXT_KEYS = ("method", "label", "protocol", "run")
_OMITTED_WHEN_NONE = ("label", "denoiser", *_OPTIONAL_IDENTITY)


def file_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a file's content, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sidecar_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".json")


@dataclass
class Sidecar:
    """A result file's sidecar. Sampling settings (SAMPLING_KEYS) and the denoiser are written
    only when set."""

    mode: str | None = None
    method: str | None = None  # the main columns' method (radii files: the sequential one)
    layout: str | None = None  # certify's --method; "radii" for a radii file
    split: str | None = None
    n0: int | None = None
    n: int | None = None  # None where n is not fixed (sequential, adaptive)
    alpha: float | None = None
    grid: int | None = None
    skip: int | None = None
    max: int | None = None
    seed: int | None = None
    sigma: float | None = None
    dataset: str | None = None
    amp: str | None = None
    compile: bool | str | None = None  # True: ran compiled; "bf16 weights" etc.: compiled with
    # the weights cast (under amp); None: eager
    num_classes: int | None = None
    checkpoint: str | None = None  # for display; the content is checkpoint_sha256
    checkpoint_sha256: str | None = None
    checkpoint_format: str | None = None
    arch: str | None = None
    protocol: str | None = None  # the example selection in words
    label: str | None = None  # how tables name the file (the demo's)
    format: str | None = FORMAT
    sampling: str | None = None  # None (fixed n), "sequential" (radii) or "adaptive"
    radii: list[float] | None = None
    max_n: int | None = None
    confidence_sequence: str | None = None
    batch: int | None = None  # a radii run's look interval
    tolerance: float | None = None
    final_share: float | None = None  # a radii run's final look (None: none, as before it;
    # a run with final_share 0 writes none, so that such files keep their fingerprints)
    precision: float | None = None  # a radii run's stopping precision (None: every radius)
    futility: float | None = None  # a radii run's futility level (None: none, as before it)
    denoiser: str | None = None  # certify --denoiser, for display; the content is denoiser_sha256
    denoiser_sha256: str | None = None
    model: str | None = None  # a user's file: the spec, or torchscript / pickle
    model_kwargs: dict[str, Any] | None = None
    normalization: dict[str, list[float]] | str | None = None  # {'mean', 'std'} or "none"
    classes: list[str] | None = None  # the class names, by label (imagefolder)
    image_size: int | None = None  # a user's dataset's
    sound: str | None = None  # None: ordinary sampling; "exact"/"round": sound (lattice.py)
    run: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys of other versions, kept as read
    unset: frozenset[str] = field(default=frozenset(), compare=False)  # keys the file lacked

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Sidecar:
        names = _field_names()
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names},
                   unset=frozenset(names - set(data)))

    @classmethod
    def build(cls, extra: Mapping[str, Any], **settings: Any) -> Sidecar:
        """A run's sidecar: `settings` (fields) over `extra` (the caller's keys), fingerprinted."""
        unknown = sorted(set(settings) - _field_names())
        if unknown:
            raise TypeError(f"Sidecar has no field {', '.join(unknown)}")
        made = cls.from_json({**extra, **settings})
        return replace(made, run=made.fingerprint(), unset=made.unset - {"run"})

    def to_json(self) -> dict[str, Any]:
        """The sidecar as written: keys that were absent from a file read stay absent."""
        values = {name: getattr(self, name) for name in _field_names() - self.unset}
        for key in _OMITTED_WHEN_NONE:
            if values.get(key) is None:
                values.pop(key, None)
        return {**self.extra, **values}

    def identity(self) -> dict[str, Any]:
        """The settings a run is identified by: IDENTITY_KEYS, and those of the
        SAMPLING_KEYS, DENOISER_KEYS, USER_KEYS, NOISE_KEYS and EXECUTION_KEYS that are set."""
        found = {key: getattr(self, key) for key in IDENTITY_KEYS}
        found.update({key: getattr(self, key) for key in _OPTIONAL_IDENTITY
                      if getattr(self, key) is not None})
        return found

    def fingerprint(self) -> str:
        """The `run` column: 12 hex digits of the sha256 of the identity settings."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def differences(self, other: Sidecar) -> list[str]:
        """Each identity setting that differs, with both values: `n (was 200, now 100)`."""
        return [f"{k} (was {getattr(self, k)!r}, now {getattr(other, k)!r})"
                for k in (*IDENTITY_KEYS, *_OPTIONAL_IDENTITY)
                if getattr(self, k) != getattr(other, k)]

    def lacks(self, *keys: str) -> list[str]:
        """Those of `keys` the file did not record."""
        return [k for k in keys if k in self.unset]

    def lacks_value(self, *keys: str) -> list[str]:
        """Those of `keys` without a value (absent or null)."""
        return [k for k in keys if getattr(self, k) is None]

    @property
    def is_own(self) -> bool:
        """Whether it was written by smoothcert (this version or an earlier one)."""
        return self.format == FORMAT and "format" not in self.unset or not self.lacks(
            "mode", "method", "protocol")


def _field_names() -> set[str]:
    return {f.name for f in fields(Sidecar)} - {"extra", "unset"}


def read_json(path: str | os.PathLike) -> dict | None:
    """The sidecar of result file `path` as read (a dict), None when there is none."""
    sidecar = sidecar_path(path)
    if not sidecar.exists():
        return None
    try:
        meta = json.loads(sidecar.read_bytes().decode("utf-8-sig"))  # a BOM is not content
    except UnicodeDecodeError as err:
        raise ValueError(f"{sidecar}: not UTF-8 text ({err})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{sidecar}: not valid JSON ({err})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{sidecar}: expected a JSON object, got {type(meta).__name__}")
    for key in _TEXT_KEYS:
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{sidecar}: '{key}' must be a string, got {meta[key]!r}")
    return meta


def read(path: str | os.PathLike) -> Sidecar | None:
    """The sidecar of result file `path`, None when there is none."""
    meta = read_json(path)
    return None if meta is None else Sidecar.from_json(meta)


def write(path: str | os.PathLike, sidecar: Sidecar) -> None:
    atomic_write_json(sidecar_path(path), sidecar.to_json())
