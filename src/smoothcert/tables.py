"""Certified-accuracy tables as Markdown, LaTeX (ASCII only, booktabs, each column's best value in
\\textbf) or CSV: one row per curve, one column per radius, then ACR and the count."""

from __future__ import annotations

import csv
import io
import re
import unicodedata

import numpy as np

from .plotfile import PNG_SIGNATURE as PNG_SIGNATURE


def _fixed(value: float, digits: int) -> str:
    return "-" if np.isnan(value) else f"{value:.{digits}f}"


# Greek letters and symbols of labels and notes: LaTeX math in a cell, words in a comment.
_SYMBOLS = {"α": "alpha", "β": "beta", "γ": "gamma", "δ": "delta", "ε": "varepsilon",
            "η": "eta", "λ": "lambda", "μ": "mu", "σ": "sigma", "τ": "tau", "ℓ": "ell"}
_ASCII = {"−": "-", "–": "-", "—": "-", "′": "'", "×": "x", "≥": ">=", "≤": "<=", "…": "..."}
# A symbol with the value it is set to ("σ=0.5", "λ0.1") is one formula, as is a lone minus.
_FORMULA = re.compile(
    rf"([{''.join(_SYMBOLS)}])((?:\s*=\s*)?[−-]?[0-9][0-9.]*(?:e[−+-]?[0-9]+)?)?|−")


def ascii_text(text: str) -> str:
    """`text` in ASCII: symbols as words (σ -> sigma), accents dropped, anything else '?'."""
    text = "".join(_SYMBOLS.get(ch, "").removeprefix("var") or _ASCII.get(ch, ch) for ch in text)
    return "".join(ch if ch.isascii() else
                   unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode() or "?"
                   for ch in text)


def _latex_escape(text: str) -> str:
    special = {
        "\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#",
        "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\^{}",
    }  # fmt: skip
    return "".join(special.get(ch, ch) for ch in ascii_text(text))


def latex_text(text: str) -> str:
    """A label as pdflatex reads it without Unicode set-up: "σ=0.5" -> "$\\sigma=0.5$", a minus
    "$-$", LaTeX's special characters escaped; pure ASCII."""
    out, end = [], 0
    for match in _FORMULA.finditer(text):
        out.append(_latex_escape(text[end:match.start()]))
        symbol, value = match.groups()
        value = re.sub(r"\s", "", value or "").replace("−", "-")
        out.append(rf"$\{_SYMBOLS[symbol]}{value}$" if symbol else "$-$")
        end = match.end()
    return "".join(out) + _latex_escape(text[end:])


def markdown_table(rows: list[tuple], radii: np.ndarray) -> str:
    head = ["Method \\ ℓ2 radius", *(f"{r:.2f}" for r in radii), "ACR", "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
    for name, acc, acr, n in rows:
        cells = [name.replace("|", "\\|"), *(_fixed(a, 2) for a in acc), _fixed(acr, 3), str(n)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _bold_best(cells: list[list[str]]) -> list[list[str]]:
    """Each column's best value (as printed: ties all) in \\textbf{}; none in a column of
    zeros, where no method certifies anything."""
    columns = list(zip(*cells, strict=True))
    best = [max((float(c) for c in column if c != "-"), default=0.0) for column in columns]
    return [[rf"\textbf{{{c}}}" if c != "-" and b > 0 and float(c) == b else c
             for c, b in zip(row, best, strict=True)] for row in cells]


def latex_table(rows: list[tuple], radii: np.ndarray) -> str:
    k = len(radii)
    lines = [
        r"\begin{tabular}{l" + "r" * (k + 2) + "}",
        r"\toprule",
        rf"Method & \multicolumn{{{k}}}{{c}}{{$\ell_2$ radius}} & ACR & $n$ \\",
        rf"\cmidrule(lr){{2-{k + 1}}}",
        " & " + " & ".join(f"{r:.2f}" for r in radii) + r" & & \\",
        r"\midrule",
    ]
    numbers = _bold_best([[*(_fixed(a, 2) for a in acc), _fixed(acr, 3)]
                          for _, acc, acr, _ in rows]) if rows else []
    for (name, *_, n), cells in zip(rows, numbers, strict=True):
        lines.append(" & ".join([latex_text(name), *cells, str(n)]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[tuple], radii: np.ndarray) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["method", *(repr(float(r)) for r in radii), "ACR", "n"])
    for name, acc, acr, n in rows:
        writer.writerow([name, *(repr(float(a)) for a in acc), repr(acr), n])
    return out.getvalue()
