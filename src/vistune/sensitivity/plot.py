"""SPT stage A, part 3: a picture of where an allocation put the budget."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from vistune.io import save_figure_atomic
from vistune.backbones import VIT_MATRICES
from vistune.sensitivity.allocate import Allocation, UnitChoice

# ------------------------------------------------------------------------------------------------
# The picture


def _fmt(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 1e6:.3g}M" if n >= 1e5 else f"{n / 1e3:.3g}k" if n >= 1e3 else str(n)


def _title(alloc: Allocation) -> str:
    kind = {"lora": "SPT-LoRA", "adapter": "SPT-Adapter", "none": "SPT (unstructured)"}[alloc.structured_type]
    if alloc.target:
        delta = f" ({alloc.realised / alloc.target - 1:+.1%})"
        budget = f"target {_fmt(alloc.target)}, realised {_fmt(alloc.realised)}{delta}"
    else:
        budget = f"realised {_fmt(alloc.realised)}"
    return f"{kind} on {alloc.arch}: {budget}"


def plot_allocation(allocation: Allocation, path: str | os.PathLike) -> Path:
    """Draw where the budget went and save it (PNG/PDF/SVG by suffix).

    ViTs: a blocks × (q, k, v, proj, fc1, fc2) heat-map whose colour is the share of the matrix's
    entries that are sensitive, with an L (LoRA) or A (adapter) where the matrix got a structured
    module, beside a per-block bar chart of tuned parameters by kind. CNNs and other models: one
    bar per weight tensor in model order (tuned parameters, log scale), coloured by what it got.
    The title gives target vs realised budget. Uses matplotlib's object API with the Agg canvas, so
    no global backend state is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    vit = [c for c in allocation.choices if c.unit.mtype is not None]
    if vit:
        fig = _plot_vit(allocation, vit, Figure)
    else:
        fig = _plot_layers(allocation, Figure)
    FigureCanvasAgg(fig)
    return save_figure_atomic(fig, path, dpi=120)


def _share(c: UnitChoice) -> float:
    n = c.sensitive if c.sensitive is not None else c.params
    return min(1.0, n / max(c.unit.numel, 1))


def _plot_vit(alloc: Allocation, vit: list[UnitChoice], Figure) -> Any:
    from matplotlib.colors import PowerNorm
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    depth = max(c.unit.block for c in vit) + 1
    cols = list(VIT_MATRICES)
    grid = torch.full((depth, len(cols)), float("nan"))
    marks: list[tuple[int, int, str]] = []
    per_block = {k: [0] * depth for k in ("structured", "unstructured", "vectors")}
    outside = 0
    for c in alloc.choices:
        u = c.unit
        if u.mtype is not None:
            grid[u.block, cols.index(u.mtype)] = 100.0 * _share(c)
            if c.mode == "structured":
                marks.append((u.block, cols.index(u.mtype), "L" if alloc.structured_type == "lora" else "A"))
        if u.block is None:
            outside += c.params
            continue
        key = "vectors" if u.kind == "vector" else c.mode
        if key in per_block:
            per_block[key][u.block] += c.params
    fig = Figure(figsize=(10, 1.2 + 0.42 * depth))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    vmax = max(float(torch.nan_to_num(grid, 0.0).max()), 1e-3)
    # a square-root colour scale: shares span orders of magnitude between early and late blocks
    im = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto", norm=PowerNorm(0.5, vmin=0.0, vmax=vmax))
    for bi, ci, text in marks:
        ax.text(ci, bi, text, ha="center", va="center", color="white", fontweight="bold",
                bbox=dict(boxstyle="circle,pad=0.15", fc="black", alpha=0.55, lw=0))
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(depth), [str(i) for i in range(depth)])
    ax.set_ylabel("block")
    ax.set_title("sensitive entries per matrix (%)  L/A = structured", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.05)
    left = [0] * depth
    colours = {"structured": "tab:orange", "unstructured": "tab:blue", "vectors": "tab:green"}
    for key, vals in per_block.items():
        bx.barh(range(depth), vals, left=left, color=colours[key], label=key)
        left = [a + b for a, b in zip(left, vals)]
    bx.invert_yaxis()
    bx.set_yticks(range(depth), [str(i) for i in range(depth)])
    bx.set_xlabel("tuned parameters")
    bx.xaxis.set_major_locator(MaxNLocator(4))
    bx.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(int(v))))
    bx.legend(fontsize=8, loc="lower right")
    if outside:
        bx.set_title(f"per block (+{_fmt(outside)} outside blocks)", fontsize=9)
    else:
        bx.set_title("per block", fontsize=9)
    fig.suptitle(_title(alloc), fontsize=11)
    fig.tight_layout()
    return fig


def _plot_layers(alloc: Allocation, Figure) -> Any:
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter

    mats = [c for c in alloc.choices if c.unit.kind != "vector"]
    vec = [c for c in alloc.choices if c.unit.kind == "vector"]
    colours = {"structured": "tab:orange", "unstructured": "tab:blue"}
    fig = Figure(figsize=(max(6.0, 0.28 * len(mats) + 2), 4.4))
    ax = fig.subplots()
    xs = range(len(mats))
    ax.bar(xs, [c.params for c in mats], color=[colours.get(c.mode, "lightgrey") for c in mats])
    ax.set_yscale("symlog", linthresh=10)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _fmt(int(v))))
    ax.set_xticks(xs, [c.unit.module or c.unit.param for c in mats], rotation=90, fontsize=7)
    ax.set_ylabel("tuned parameters")
    share = ax.twinx()
    share.plot(xs, [100.0 * _share(c) for c in mats], "k.", markersize=5)
    share.set_ylabel("sensitive entries (%)")
    share.set_ylim(bottom=0)
    whole = sum(c.params for c in vec if c.mode == "whole")
    sparse = sum(c.params for c in vec if c.mode == "unstructured")
    handles = [Patch(color=colour, label=mode) for mode, colour in colours.items()]
    handles.append(ax.plot([], [], "k.", label="sensitive share")[0])
    ax.legend(handles=handles, fontsize=8, loc="upper left",
              title=f"vectors: {_fmt(whole)} whole, {_fmt(sparse)} sparse entries", title_fontsize=8)
    fig.suptitle(_title(alloc), fontsize=11)
    fig.tight_layout()
    return fig
