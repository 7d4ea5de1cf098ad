"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

    import pandas as pd


def markdown_table(frame: pd.DataFrame, digits: int = 3, index: bool = False) -> str:
    """A GitHub markdown table (no extra dependency)."""
    frame = frame.reset_index() if index else frame

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.{digits}f}"
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return str(v)

    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def write_results(out: Path, name: str, title: str, command: str, table: pd.DataFrame,
                  notes: list[str] | None = None) -> None:  # fmt: skip
    """``<out>/<name>.md`` (title, the command line, the table, notes) and ``<name>.json``.

    The page is printed as well; the JSON holds the table's records.
    """
    text = [f"# {title}", "", command, "", markdown_table(table, digits=3), *(notes or [])]
    (out / f"{name}.md").write_text("\n".join(text) + "\n")
    (out / f"{name}.json").write_text(table.to_json(orient="records", indent=2))
    print("\n".join(text))
