"""Readable summaries of tidy metric tables (README tables, CLI output)."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

HEADLINE_METRICS: tuple[str, ...] = ("pearson_delta_de", "mse_de")


def summary_table(tidy: pd.DataFrame, metrics: Sequence[str] = HEADLINE_METRICS) -> pd.DataFrame:
    """Mean of each metric over conditions, per model and subgroup (rows) and metric (columns)."""
    rows = tidy[tidy["metric"].isin(metrics) & tidy["condition"].notna()]
    table = rows.groupby(["subgroup", "model", "metric"], sort=False)["value"].mean().unstack("metric")
    return table[[metric for metric in metrics if metric in table.columns]]


def summary_markdown(tidy: pd.DataFrame, metrics: Sequence[str] = HEADLINE_METRICS, digits: int = 3) -> str:
    """`summary_table` as a Markdown table, one line per (subgroup, model)."""
    table = summary_table(tidy, metrics)
    header = "| subgroup | model | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 2)]
    for (subgroup, model), values in table.iterrows():
        cells = " | ".join(f"{value:.{digits}f}" for value in values)
        lines.append(f"| {subgroup} | {model} | {cells} |")
    return "\n".join(lines)
