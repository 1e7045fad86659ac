"""A table of rows and columns, written as Markdown and CSV."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Column:
    """A table column: ``key`` in the row dicts, Markdown header, number format.

    ``std`` names the key of a standard deviation shown as ``mean ± std``; ``optional``
    columns are dropped when no row has a value.
    """

    key: str
    header: str
    fmt: str = ""
    std: str | None = None
    optional: bool = False


@dataclass
class Table:
    """A named table: title, columns, row dicts and notes; Markdown and CSV writers."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    # what a figure of this table needs (sweeps: parameters, method, paper data set)
    meta: dict[str, Any] = field(default_factory=dict)

    def visible_columns(self) -> list[Column]:
        return [
            c
            for c in self.columns
            if not c.optional or any(r.get(c.key) not in (None, "") for r in self.rows)
        ]

    def to_markdown(self) -> str:
        cols = self.visible_columns()
        lines = [f"### {self.title}", ""]
        lines.append("| " + " | ".join(c.header for c in cols) + " |")
        lines.append("|" + "|".join("---" if c.fmt == "s" else "---:" for c in cols) + "|")
        for row in self.rows:
            cells = []
            for c in cols:
                text = _format(row.get(c.key), c.fmt)
                if c.std and row.get(c.std) is not None and row.get(c.key) is not None:
                    text += f" ± {_format(row[c.std], c.fmt)}"
                cells.append(text.replace("|", "\\|"))
            lines.append("| " + " | ".join(cells) + " |")
        if self.notes:
            lines.append("")
            lines.extend(f"- {n}" for n in self.notes)
        return "\n".join(lines) + "\n"

    def write_csv(self, path: Path) -> Path:
        cols = self.visible_columns()
        keys: list[str] = []
        for c in cols:
            keys.append(c.key)
            if c.std:
                keys.append(c.std)
        with path.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(keys)
            for row in self.rows:
                writer.writerow(["" if row.get(k) is None else row.get(k) for k in keys])
        return path


def _format(value: Any, fmt: str) -> str:
    if value is None or value == "":
        return "–"
    if fmt == "t":  # minutes: 2 decimals, or 3 significant digits below one minute
        return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"
    if fmt == "m":  # LM metrics: perplexities run from ~10 to millions
        return f"{value:,.0f}" if abs(value) >= 10000 else f"{value:.2f}"
    if fmt not in ("", "s") and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return format(value, fmt)
        except ValueError:  # e.g. "d" given a float
            return format(value, "g")
    return str(value)
