"""Readable summaries of tidy metric tables (README tables, CLI output, comparison reports).

`ReportDocument` holds a report as a list of blocks (headings, text, tables, figures, code) and renders
the same content twice: Markdown that links its figures, and one self-contained HTML file with the
figures embedded, which can be mailed or attached to a lab notebook as it is.
"""

from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from perturbedvae.evaluate.plots import png_base64

HEADLINE_METRICS: tuple[str, ...] = ("pearson_delta_de", "mse_de")
SEED_TABLE_METRICS: tuple[str, ...] = ("pearson_delta_de", "mse_de", "frac_opposite_direction_de", "nrmse", "rank")
"""Metrics of the per-subgroup tables of comparison reports (mean ± sd over seeds)."""


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


def seed_statistics(tidy: pd.DataFrame, metrics: Sequence[str] = SEED_TABLE_METRICS, model_column: str = "model") -> pd.DataFrame:
    """Mean and sd over seeds of the per-seed subgroup means (each seed's mean over its conditions).

    Returns:
        Columns subgroup, model, metric, mean, sd, n_seeds; sd is NaN with a single seed.
    """
    rows = tidy[tidy["metric"].isin(metrics) & tidy["condition"].notna()]
    per_seed = rows.groupby(["subgroup", model_column, "metric", "seed"], sort=False)["value"].mean()
    stats = per_seed.groupby(["subgroup", model_column, "metric"], sort=False).agg(["mean", "std", "count"]).reset_index()
    return stats.rename(columns={model_column: "model", "std": "sd", "count": "n_seeds"})


def seed_summary_frame(tidy: pd.DataFrame, metrics: Sequence[str] = SEED_TABLE_METRICS, model_column: str = "model", digits: int = 3) -> pd.DataFrame:
    """`seed_statistics` as text cells `mean ± sd`, one row per (subgroup, model), one column per metric."""
    stats = seed_statistics(tidy, metrics, model_column)
    stats["cell"] = [_mean_sd(mean, sd, digits) for mean, sd in zip(stats["mean"], stats["sd"])]
    table = stats.pivot_table(index=["subgroup", "model"], columns="metric", values="cell", aggfunc="first", sort=False)
    return table[[metric for metric in metrics if metric in table.columns]].reset_index()


def seed_summary_markdown(tidy: pd.DataFrame, metrics: Sequence[str] = SEED_TABLE_METRICS, model_column: str = "model") -> str:
    """`seed_summary_frame` as one Markdown table."""
    return frame_markdown(seed_summary_frame(tidy, metrics, model_column))


def _mean_sd(mean: float, sd: float, digits: int) -> str:
    return f"{mean:.{digits}f}" if pd.isna(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def frame_markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    """A small frame as a Markdown table (floats rounded, NaN shown as a dash)."""
    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    for values in frame.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(value, digits) for value in values) + " |")
    return "\n".join(lines)


def _cell(value: object, digits: int) -> str:
    if isinstance(value, float):
        return "–" if pd.isna(value) else f"{value:.{digits}f}"
    return str(value)


@dataclass
class ReportDocument:
    """A report as ordered blocks, rendered to Markdown (`to_markdown`) and self-contained HTML (`to_html`)."""

    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(("heading", (level, text)))

    def text(self, text: str) -> None:
        """A paragraph; `code` and **bold** are rendered in both formats."""
        self.blocks.append(("text", text))

    def table(self, frame: pd.DataFrame, digits: int = 3) -> None:
        self.blocks.append(("table", (frame, digits)))

    def figure(self, path: Path, caption: str) -> None:
        """A PNG under the report directory (linked in Markdown, embedded in HTML)."""
        self.blocks.append(("figure", (Path(path), caption)))

    def code(self, text: str, language: str = "") -> None:
        self.blocks.append(("code", (text, language)))

    def to_markdown(self, root: Path) -> str:
        """Markdown with figure links relative to `root`, the report directory."""
        parts = [f"# {self.title}"]
        for kind, content in self.blocks:
            if kind == "heading":
                level, text = content
                parts.append(f"{'#' * level} {text}")
            elif kind == "text":
                parts.append(content)
            elif kind == "table":
                parts.append(frame_markdown(*content))
            elif kind == "figure":
                path, caption = content
                parts.append(f"![{caption}]({path.relative_to(root).as_posix()})\n\n*{caption}*")
            else:
                text, language = content
                parts.append(f"```{language}\n{text.rstrip()}\n```")
        return "\n\n".join(parts) + "\n"

    def to_html(self) -> str:
        """One HTML page with every figure embedded as base64 PNG (no external files)."""
        parts = [f"<h1>{html.escape(self.title)}</h1>"]
        for kind, content in self.blocks:
            if kind == "heading":
                level, text = content
                parts.append(f"<h{level}>{_inline_html(text)}</h{level}>")
            elif kind == "text":
                parts.append(f"<p>{_inline_html(content)}</p>")
            elif kind == "table":
                frame, digits = content
                header = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
                body = "".join(
                    "<tr>" + "".join(f"<td>{html.escape(_cell(value, digits))}</td>" for value in values) + "</tr>"
                    for values in frame.itertuples(index=False)
                )
                parts.append(f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>")
            elif kind == "figure":
                path, caption = content
                parts.append(
                    f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{png_base64(path)}">'
                    f"<figcaption>{_inline_html(caption)}</figcaption></figure>"
                )
            else:
                text, _ = content
                parts.append(f"<pre><code>{html.escape(text.rstrip())}</code></pre>")
        style = ("body{font-family:sans-serif;max-width:1200px;margin:2em auto;line-height:1.4}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
                 "th{background:#f0f0f0}img{max-width:100%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}"
                 "figcaption{font-style:italic;color:#444}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _inline_html(text: str) -> str:
    escaped = html.escape(text)
    escaped = re.sub(r"`([^`]+)`", r"<code>\1</code>", escaped)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", escaped)
