"""``python -m vistune.data fetch SPEC`` / ``shard SPEC --out DIR --shard-size N``.

``fetch`` reads the spec's layout (downloading a ``tv:`` data set, filling the
``datasets`` cache for a ``hf:`` hub name) without decoding images, and prints
one summary line. Used by ``scripts/demo.sh`` to find out whether a data set
can be had on this machine, and by users to fetch data on a networked machine
before going offline.

``shard`` writes any spec as WebDataset shards (``train-000000.tar`` ...) plus
``classes.json``, readable as ``wds:DIR`` (see :func:`vistune.data.wds.write_shards`):
the form in which a large data set streams to many processes and nodes.

Either prints one error line and exits 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys

from .errors import DataError
from .loader import ReadOptions, read_source
from .wds import write_shards


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vistune.data", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("fetch", help="read (download if needed) a data spec and print a summary line")
    p.add_argument("spec", help="a data spec, e.g. tv:FashionMNIST, hf:NAME, npz:PATH")
    p.add_argument(
        "--data-root", default=None, help="tv: data root (default $VISTUNE_DATA_ROOT or ~/.cache/vistune/data)"
    )
    s = sub.add_parser("shard", help="write a data spec as WebDataset shards + classes.json (read with wds:DIR)")
    s.add_argument("spec", help="any data spec, e.g. folder:DIR, npz:PATH, tv:CIFAR10")
    s.add_argument("--out", required=True, help="folder for the shards (new or empty)")
    s.add_argument("--shard-size", type=int, required=True, help="samples per shard (e.g. 10000)")
    s.add_argument("--seed", type=int, default=0, help="shuffles the train split's order across shards")
    s.add_argument("--keep-order", action="store_true",
                   help="write the train split in the source's order (no shuffle; for comparing with the source)")
    s.add_argument("--split-seed", type=int, default=0, help="carves missing val/test splits, as in training")
    s.add_argument("--data-root", default=None, help="tv: data root")
    args = parser.parse_args(argv)

    try:
        if args.command == "shard":
            summary = write_shards(args.spec, args.out, args.shard_size, split_seed=args.split_seed,
                                   seed=None if args.keep_order else args.seed, data_root=args.data_root)
            print(f"{args.spec}: {summary.line()}")
            return 0
        src = read_source(args.spec, ReadOptions(data_root=args.data_root))
    except DataError as err:
        print(f"python -m vistune.data {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the out folder cannot be written (full disk, permissions): named by the writer
        print(f"python -m vistune.data {args.command}: error: {err}", file=sys.stderr)
        return 2
    sizes = ", ".join(f"{len(raw)} {split}" for split, raw in src.splits.items())
    print(f"{args.spec}: {sizes} images, {src.num_classes} classes, at {src.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
