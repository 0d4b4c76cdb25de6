"""Table helpers both outputs use: nested dicts flattened for comparison, pandas frames as markdown."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import pandas as pd


def flatten_dict(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings as one level of dotted keys; lists become tuples, so values compare and hash."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(flatten_dict(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def markdown_table(df: pd.DataFrame, index: bool = False) -> str:
    """A pipe table (no tabulate dependency); cells are str()-ed with pipes escaped."""
    if index:
        df = df.reset_index(names="")

    def row(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|").replace("\n", " ") for c in cells) + " |"

    return "\n".join([row(df.columns), row("---" for _ in df.columns), *(row(r) for r in df.itertuples(index=False))])
