"""PNG plots for ``fxprune prune --plot`` and ``fxprune profile --plot`` (matplotlib, optional)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch.fx

from fxprune.errors import FxpruneError
from fxprune.ir.keys import LAYER_LATENCY_KEY


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise FxpruneError("plots need matplotlib: pip install 'fxprune[plot]' (or matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def widths(report, folder: Path) -> Path:
    """Channels per pruned group, before and after."""
    plt = _pyplot()
    groups = [g for g in report.groups]
    figure, axes = plt.subplots(figsize=(max(6, 0.25 * len(groups)), 4))
    x = np.arange(len(groups))
    axes.bar(x, [g.total for g in groups], color="#cccccc", label="before")
    axes.bar(x, [g.kept for g in groups], color="#3b75af", label="after")
    axes.set_xticks(x, [g.first_member for g in groups], rotation=90, fontsize=6)
    axes.set_ylabel("channels")
    axes.set_title(f"channels per group, {report.budget}")
    axes.legend()
    return _save(figure, folder / "widths.png")


def latency_curves(gm: torch.fx.GraphModule, folder: Path, layers: int = 6) -> Path:
    """Latency against output width (input at full width) for the costliest layers, from their tables."""
    plt = _pyplot()
    tables = [(node.name, node.meta[LAYER_LATENCY_KEY].table) for node in gm.graph.nodes
              if LAYER_LATENCY_KEY in node.meta]
    tables.sort(key=lambda item: -item[1].ms.max())
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, table in tables[:layers]:
        row = table.ms[-1]
        axes.plot(table.widths_out, row, marker="o", label=name)
    axes.set_xlabel("kept output channels (input at full width)")
    axes.set_ylabel("latency in the model (ms)")
    axes.set_title("the costliest layers' latency tables")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7)
    return _save(figure, folder / "latency_vs_width.png")


def predicted_vs_measured(report, folder: Path) -> Path:
    """Predicted and measured latency, before and after pruning."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(5, 4))
    x = np.arange(2)
    axes.bar(x - 0.2, [report.predicted_latency_ms_before, report.predicted_latency_ms_after], 0.4, label="predicted")
    axes.bar(x + 0.2, [report.measured_latency_ms_before, report.measured_latency_ms_after], 0.4, label="measured")
    axes.set_xticks(x, ["before", "after"])
    axes.set_ylabel(f"latency on {report.engine} (ms)")
    axes.legend()
    return _save(figure, folder / "predicted_vs_measured.png")


def _save(figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return path
