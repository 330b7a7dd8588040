"""Read speed of one training epoch: WebDataset shards vs a JPEG-bytes npz vs a folder tree.

What is timed: one epoch of the engine's training loader over the train split — decode, resize to
``--img-size``, normalise, batch — with 1 and 2 DataLoader worker processes, nothing else (no
model). The three copies hold the same encoded images (the first ``--limit`` training images of
``--data``, bytes as stored): ``folder:`` (one file per image), ``npz:`` (JPEG bytes + offsets,
random access in memory) and ``wds:`` (tar shards of ``--shard-size``, streamed). Every copy is
read lazily (``cache_mb=0``), as a data set too large for the decode cache would be, and all
three are built and checked before any timing starts.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/wds_read.py          # Tiny-ImageNet (../shared), 4,000 images
    .venv/bin/python benchmarks/wds_read.py --data folder:DIR --limit 64 --img-size 32 --workers 1   # a smoke run

Time nothing while anything else runs on the machine.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyimagenet" / \
    "tinyimagenet200_val_train20_jpeg.npz"


def build_copies(spec: str, limit: int, work: Path, shard_size: int) -> dict[str, str]:
    """Write the first ``limit`` training images of ``spec`` as a folder, an npz and shards."""
    from vistune.data import read_source
    from vistune.data.wds import write_shards

    src = read_source(spec)
    train = src.splits["train"]
    rows = list(range(min(limit, len(train))))
    small = {}  # one image per class for val and test, so no copy carves its train split
    for r in rows:
        small.setdefault(train.labels[r], r)
    splits = {"train": rows, "val": list(small.values()), "test": list(small.values())}
    folder, arrays = work / "folder", {}
    for split, chosen in splits.items():
        blobs, labels = [], []
        for i, r in enumerate(chosen):
            data, ext = src.source.encoded(train.ids[r])
            label = train.labels[r]
            path = folder / split / f"c{label:04d}" / f"{i:07d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            blobs.append(data)
            labels.append(label)
        arrays[f"{split}_jpeg"] = np.frombuffer(b"".join(blobs), np.uint8)
        arrays[f"{split}_offsets"] = np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64)
        arrays[f"{split}_labels"] = np.asarray(labels, np.int64)
    present = sorted({train.labels[r] for r in rows})
    for split in splits:  # the folder's classes are the present ones, in order: relabel the npz alike
        arrays[f"{split}_labels"] = np.searchsorted(present, arrays[f"{split}_labels"])
    npz = work / "images.npz"
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    npz.write_bytes(buf.getvalue())
    write_shards(f"folder:{folder}", work / "shards", shard_size, seed=0)
    return {"wds": f"wds:{work / 'shards'}", "npz": f"npz:{npz}", "folder": f"folder:{folder}"}


def epoch(spec: str, img_size: int, batch: int, workers: int) -> tuple[int, float, bool]:
    """Images read in one epoch of the engine's train loader, its seconds, and whether it streamed."""
    from vistune.data import load_data
    from vistune.engine.distributed import Dist

    data = load_data(spec, img_size=img_size, cache_mb=0)  # lazy: every image decoded when read
    loader = Dist().train_loader(data.train, batch, seed=0, num_workers=workers)
    n = 0
    t0 = time.perf_counter()
    for b, _ in loader:
        if b is not None:
            n += len(b[1])
    return n, time.perf_counter() - t0, data.train.stream is not None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=f"npz:{DEFAULT_DATA}", help="the source of the images (any spec)")
    p.add_argument("--limit", type=int, default=4000, help="training images to copy and read")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", default="1,2", help="DataLoader worker counts to time")
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--rounds", type=int, default=1, help="epochs per cell; the best is reported")
    p.add_argument("--work", default=None, help="folder for the three copies (default: a temp folder)")
    args = p.parse_args(argv)
    from vistune.precision import machine_line

    workers = [int(w) for w in args.workers.split(",")]
    with tempfile.TemporaryDirectory(prefix="wds-read-") as tmp:
        work = Path(args.work or tmp)
        copies = build_copies(args.data, args.limit, work, args.shard_size)
        print(machine_line())
        print(f"one epoch of {args.limit} images of {args.data}, resized to {args.img_size}, batch {args.batch_size}; "
              f"best of {args.rounds}")
        print("| source | workers | images | seconds | images/s |")
        print("|---|---|---|---|---|")
        for name, spec in copies.items():
            for w in workers:
                runs = [epoch(spec, args.img_size, args.batch_size, w) for _ in range(args.rounds)]
                n, seconds, streamed = min(runs, key=lambda r: r[1])
                label = f"{name} ({'streamed' if streamed else 'by index'})"
                print(f"| {label} | {w} | {n} | {seconds:.2f} | {n / max(seconds, 1e-9):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
