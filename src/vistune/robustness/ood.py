"""Out-of-distribution test sets: another data set's images of the run's classes.

A source class is kept when its name is one of the run's class names, or when ``--class-map``
maps it to one (several source classes may map to one run class: Tiny-ImageNet's tabby, Persian
and Egyptian cats are all CIFAR-10's ``cat``). Every other source class is dropped and counted,
so the report says how much of the OOD set was usable. A map that names a class the run does not
have, or a source class that none of the OOD sets has, is refused: a typo there would silently
drop a whole class.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from vistune.robustness.corruptions import RobustnessError


def read_class_map(path: str | os.PathLike, run_classes: Sequence[str]) -> dict[str, str]:
    """``{source class name: run class name}`` from a YAML/JSON mapping; values must be run classes."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as err:
        raise RobustnessError(f"--class-map {p}: {err.strerror or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise RobustnessError(f"--class-map {p} is not YAML/JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict) or not data:
        raise RobustnessError(f"--class-map {p}: expected a mapping 'source class: run class', "
                              f"got {type(data).__name__}")
    known = set(run_classes)
    out = {}
    for src, dst in data.items():
        if not isinstance(src, str) or not isinstance(dst, str):
            raise RobustnessError(f"--class-map {p}: entry {src!r}: {dst!r} is not 'name: name'")
        if dst not in known:
            raise RobustnessError(f"--class-map {p}: {src!r} maps to {dst!r}, which is not a class of the run "
                                  f"({', '.join(run_classes[:12])}{', …' if len(run_classes) > 12 else ''})")
        out[src] = dst
    return out


def check_map_sources(class_map: dict[str, str], source_classes: Sequence[Sequence[str]], path: str) -> None:
    """Every source name of the map must be a class of at least one OOD data set."""
    present = {name for names in source_classes for name in names}
    unknown = [s for s in class_map if s not in present]
    if unknown:
        raise RobustnessError(f"--class-map {path}: source class {unknown[0]!r} is in none of the --ood data sets "
                              f"({len(unknown)} such name(s))")


@dataclass
class OodSelection:
    """Which images of an OOD split are kept, with their labels in the run's class indices."""

    positions: list[int]
    labels: list[int]
    kept_classes: dict[str, str] = field(default_factory=dict)  # source class -> run class
    dropped_classes: list[str] = field(default_factory=list)
    dropped_images: int = 0


def select_ood(source_labels: Sequence[int], source_classes: Sequence[str], run_classes: Sequence[str],
               class_map: dict[str, str] | None) -> OodSelection:
    """Keep the images whose class maps onto a run class (by the map, else by equal name)."""
    index = {name: i for i, name in enumerate(run_classes)}
    target: dict[int, int] = {}
    kept: dict[str, str] = {}
    for i, name in enumerate(source_classes):
        dst = (class_map or {}).get(name, name if name in index else None)
        if dst is not None:
            target[i] = index[dst]
            kept[name] = dst
    counts = Counter(int(y) for y in source_labels)
    dropped = [source_classes[c] for c in sorted(counts) if c not in target]
    positions = [p for p, y in enumerate(source_labels) if int(y) in target]
    return OodSelection(positions=positions, labels=[target[int(source_labels[p])] for p in positions],
                        kept_classes=kept, dropped_classes=dropped,
                        dropped_images=sum(n for c, n in counts.items() if c not in target))
