"""The few-shot protocol: K shots per class × seeds × variants, on the full test split.

A *variant* is a method name, optionally with ``+pvp`` (its modules initialised from a
pre-trained module file). Every (variant, K, seed) is an ordinary ``train`` run in its own
folder, so each number in the table can be traced to a metrics.json and a file list.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from pathlib import Path
from typing import Any

from vistune.config import ConfigError, TrainConfig


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    method: str
    pvp: bool


def parse_variants(text: str) -> list[Variant]:
    out = []
    for part in [p.strip() for p in text.split(",") if p.strip()]:
        method, plus, tag = part.partition("+")
        if plus and tag != "pvp":
            raise ConfigError(f"variant {part!r}: only '+pvp' may follow a method name")
        out.append(Variant(part, method, bool(plus)))
    if not out:
        raise ConfigError("--compare needs at least one variant, e.g. vpt,vpt+pvp,linear")
    return out


def split_options(options: dict[str, Any], method: str) -> dict[str, Any]:
    """``-o rank=4`` applies to every variant; ``-o lora:rank=4`` only to lora variants."""
    out = {}
    for key, value in options.items():
        scope, colon, name = key.partition(":")
        if not colon:
            out[key] = value
        elif scope == method:
            out[name] = value
    return out


def run_fewshot(
    base: TrainConfig,
    shots: list[int],
    seeds: list[int],
    variants: list[Variant],
    pvp_files: dict[str, str],
    out: str | os.PathLike,
    lr_for: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Run every (variant, K, seed); write ``fewshot.json``, ``fewshot.md`` and ``fewshot.png``."""
    from vistune.engine.trainer import train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for v in variants:
        if v.pvp and v.method not in pvp_files:
            raise ConfigError(f"variant {v.label!r} needs a module file: --pvp {v.method}=FILE")
    runs: list[dict[str, Any]] = []
    for v in variants:
        for k in shots:
            for s in seeds:
                run_dir = out / v.label / f"{k}shot" / f"seed{s}"
                cfg = dataclasses.replace(
                    base,
                    method=v.method,
                    options=split_options(base.options, v.method),
                    shots=k,
                    seed=s,
                    init_from=pvp_files[v.method] if v.pvp else None,
                    lr=(lr_for or {}).get(v.label, (lr_for or {}).get(v.method, base.lr)),
                    out=str(run_dir),
                )
                m = train(cfg)
                runs.append({"variant": v.label, "shots": k, "seed": s, "test_top1": m["test_top1"],
                             "val_top1": m["val_top1"], "tuned_params": m["tuned_params"],
                             "train_seconds": m["train_seconds"], "dir": str(run_dir)})
                _write(out, runs, variants, shots)
    return _write(out, runs, variants, shots)


def summarise(runs: list[dict[str, Any]], variants: list[Variant], shots: list[int]) -> dict[str, Any]:
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        table[v.label] = {}
        for k in shots:
            accs = [r["test_top1"] for r in runs if r["variant"] == v.label and r["shots"] == k]
            if accs:
                table[v.label][str(k)] = {
                    "mean": statistics.fmean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "n": len(accs),
                }
    return table


def markdown(table: dict[str, Any], shots: list[int]) -> str:
    lines = ["| variant | " + " | ".join(f"{k}-shot" for k in shots) + " |",
             "|---|" + "---|" * len(shots)]
    for label, row in table.items():
        cells = [f"{row[str(k)]['mean']:.1f} ± {row[str(k)]['std']:.1f}" if str(k) in row else "-" for k in shots]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(table: dict[str, Any], shots: list[int], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, row in table.items():
        ks = [k for k in shots if str(k) in row]
        if not ks:
            continue
        mean = [row[str(k)]["mean"] for k in ks]
        std = [row[str(k)]["std"] for k in ks]
        ax.plot(ks, mean, marker="o", label=label)
        ax.fill_between(ks, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("shots per class")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title or "few-shot transfer (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def _write(out: Path, runs, variants, shots) -> dict[str, Any]:
    table = summarise(runs, variants, shots)
    result = {"shots": shots, "variants": [v.label for v in variants], "table": table, "runs": runs}
    tmp = out / "fewshot.json.tmp"
    tmp.write_text(json.dumps(result, indent=2))
    os.replace(tmp, out / "fewshot.json")
    (out / "fewshot.md").write_text(markdown(table, shots) + "\n")
    plot(table, shots, out / "fewshot.png")
    return result
