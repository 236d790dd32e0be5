"""The PNG files smoothcert writes: marked as its own, written atomically, and replacing only
a plot smoothcert wrote (never a result file named by mistake)."""

from __future__ import annotations

import io
import os
from pathlib import Path

from .io import atomic_write_bytes, check_output_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# A tEXt chunk every plot carries, so that --plot replaces only plots smoothcert wrote.
PLOT_MARK = ("smoothcert", "analyze plot")


def save_figure(fig, path: str | os.PathLike) -> None:
    """Write a matplotlib figure as a PNG marked as smoothcert's, atomically; like every plot,
    it replaces only a plot smoothcert wrote."""
    check_plot_target(Path(path))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight",
                metadata={PLOT_MARK[0]: PLOT_MARK[1]})
    atomic_write_bytes(path, buffer.getvalue())


def check_plot_target(path: Path) -> None:
    """Refuse to replace anything but a plot smoothcert wrote, or a path below a file."""
    if not path.exists():
        check_output_path(path, "plot")
        return
    data = path.read_bytes() if path.is_file() else b""
    if not (data.startswith(PNG_SIGNATURE) and PLOT_MARK in _png_text(data)):
        raise ValueError(
            f"plot: '{path}' exists and is not a plot smoothcert wrote; smoothcert does not "
            "overwrite it: choose another --plot"
        )


def _png_text(data: bytes) -> set[tuple[str, str]]:
    """The (keyword, text) pairs of a PNG's tEXt chunks."""
    found, pos = set(), len(PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            key, _, text = body.partition(b"\0")
            found.add((key.decode("latin-1"), text.decode("latin-1")))
        if kind == b"IEND":
            break
        pos += 12 + length  # length, type, data, crc
    return found
