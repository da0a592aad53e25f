"""Tables, JSON and plots of a retrain or an evaluation.

Nothing here decides or computes quality: the retrain job (:func:`.retrain.retrain`)
returns a :class:`~.retrain.RetrainResult` and evaluations return
:class:`~.evaluate.RoutingQuality` rows; the command line and the demo hand
them to these functions afterwards, so a report that fails to write never
changes what was published.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Mapping, Sequence

from .evaluate import RoutingQuality

log = logging.getLogger(__name__)


def _row(q: RoutingQuality | Mapping) -> dict:
    return asdict(q) if isinstance(q, RoutingQuality) else dict(q)


def format_table(table: Mapping[str, Sequence[RoutingQuality | Mapping]], k: int | None = None) -> str:
    """A plain-text table: one line per nprobe, top-1 accuracy and recall@k per router.

    ``table`` maps a router name to its rows, as :class:`~.evaluate.RoutingQuality`
    or as their dicts (:attr:`.retrain.RetrainResult.table`); every router has
    the same nprobe values in the same order. ``k`` defaults to the rows' own.
    """
    names = list(table)
    if not names:
        return ""
    rows = {n: [_row(q) for q in table[n]] for n in names}
    if k is None:
        k = rows[names[0]][0]["k"] if rows[names[0]] else 10
    header = "nprobe " + " ".join(f"{n + ' top1':>16} {n + f' R@{k}':>16}" for n in names)
    lines = [header]
    for i, row in enumerate(rows[names[0]]):
        cells = [f"{rows[n][i]['top1_accuracy']:>16.4f} {rows[n][i]['recall']:>16.4f}" for n in names]
        lines.append(f"{row['nprobe']:>6} " + " ".join(cells))
    return "\n".join(lines)


def quality_json(table: Mapping[str, Sequence[RoutingQuality | Mapping]]) -> str:
    """An evaluation (router name -> quality rows) as indented JSON."""
    return json.dumps({name: [_row(q) for q in rows] for name, rows in table.items()}, indent=2)


def retrain_quality(result) -> dict[str, list[RoutingQuality]]:
    """A retrain's held-out quality per router, plus the new router's adaptive-nprobe rows
    (as ``"learned, adaptive"`` or ``"moments, adaptive"``, after the table row of the
    router the retrain chose: ``result.training["router_kind"]``; one row per recall_target)."""
    table = {name: [RoutingQuality(**q) for q in rows] for name, rows in result.table.items()}
    if result.adaptive:
        chosen = "moments" if result.training.get("router_kind") == "moments" else "learned"
        table[f"{chosen}, adaptive"] = [
            RoutingQuality(**{k: v for k, v in row.items() if k != "recall_target"})
            for row in result.adaptive]
    return table


def plot_quality(table: Mapping[str, Sequence[RoutingQuality]], path, title: str = "") -> Path | None:
    """A PNG of top-1 accuracy and recall@k against partitions probed, one line per router;
    ``None`` (and a warning) without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib not installed; skipping the PNG report")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, rows in table.items():
        x = [r.mean_probed for r in rows]
        style = "--" if "adaptive" in name else "-"
        axes[0].plot(x, [r.top1_accuracy for r in rows], style, marker="o", label=name)
        axes[1].plot(x, [r.recall for r in rows], style, marker="o", label=name)
    first = next((rows for rows in table.values() if rows), None)
    k = first[0].k if first else 10
    for ax, ylabel in zip(axes, ["top-1 accuracy", f"recall@{k}"]):
        ax.set_xscale("log")
        ax.set_xlabel("partitions probed (nprobe, or mean for adaptive)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def write_report(result, report_dir) -> list[str]:
    """Write a retrain's result as JSON and, when matplotlib is installed, a PNG of
    accuracy and recall against nprobe into ``report_dir`` (created if missing).

    Returns the paths written. Raises ``OSError`` when the directory or a file
    cannot be written; callers that already published log it instead of failing.
    """
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"retrain-{result.collection}-{time.strftime('%Y%m%dT%H%M%S')}"
    paths = [out / f"{stem}.json"]
    paths[0].write_text(result.to_json())
    png = plot_quality(retrain_quality(result), out / f"{stem}.png",
                       title=f"{result.collection}: {result.decision}")
    if png:
        paths.append(png)
    return [str(p) for p in paths]
