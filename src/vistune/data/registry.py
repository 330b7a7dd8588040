"""The one table of data-spec kinds: who reads each, how it is written, which task it feeds.

A spec is ``kind:argument``. Every kind, classification or dense, is a :class:`Reader` in
:data:`READERS`: the function that turns its on-disk layout into a
:class:`~vistune.data.sources.SourceData`, the one-line usage printed when a spec is wrong,
and the tasks its targets can feed (``classify``: an integer label per image; ``segment`` /
``detect``: a mask or boxes per image). One parser (:func:`parse_spec`) and one dispatch
(:func:`vistune.data.loader.read_source`) serve all of them, so an unknown kind lists every
kind, and a kind used for the wrong task says which task it serves.

Readers whose package is heavy or optional (``hf``, ``tv``, ``wds``) import it only when
their spec is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from .dense import read_camvid, read_pennfudan, read_voc
from .errors import DataError
from .fashion_mnist import read_fashion_mnist
from .fgvc import read_fgvc
from .folder import read_folder
from .hf import read_hf
from .npz import read_npz
from .sources import SourceData
from .tv import read_tv
from .vtab import read_vtab

#: The tasks a reader can feed; a reader declares a subset.
CLASSIFY = ("classify",)


@dataclass(frozen=True)
class ReadOptions:
    """Reader options that only some spec kinds use (see :func:`vistune.data.load_data`)."""

    trainval: bool = False
    data_root: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    #: seeds a layout's own documented carve (Penn-Fudan has no official split)
    split_seed: int = 0


@dataclass(frozen=True)
class Reader:
    """One spec kind: ``read(argument, options)`` -> what is on disk (no pixels decoded); a plugin
    adds its own with :func:`register_reader`."""

    read: Callable[[str | None, ReadOptions], SourceData]
    usage: str
    #: ``("classify",)`` for label readers; ``"segment"``/``"detect"`` for dense targets
    tasks: tuple[str, ...] = CLASSIFY
    #: False only for ``fashion-mnist``, whose folder has a default
    needs_arg: bool = True


def _read_hf(arg: str | None, opts: ReadOptions) -> SourceData:
    return read_hf(arg or "", image_column=opts.image_column, label_column=opts.label_column)


def _read_tv(arg: str | None, opts: ReadOptions) -> SourceData:
    return read_tv(arg or "", data_root=opts.data_root)


def _read_wds(arg: str | None, opts: ReadOptions) -> SourceData:
    # local: a cycle (wds imports loader for write_shards, and loader imports this registry)
    from .wds import read_wds

    return read_wds(arg or "")


READERS: dict[str, Reader] = {
    "fashion-mnist": Reader(
        lambda arg, opts: read_fashion_mnist(arg),
        "fashion-mnist[:DIR]  (gzipped IDX files; default /usr/share/datasets/fashion-mnist)", needs_arg=False),
    "npz": Reader(
        lambda arg, opts: read_npz(arg or ""),
        "npz:PATH.npz  (MedMNIST-style {split}_{images,labels}, or JPEG bytes {split}_{jpeg,offsets,labels})"),
    "folder": Reader(
        lambda arg, opts: read_folder(arg or ""),
        "folder:DIR  (DIR/<class>/*.jpg, or DIR/{train,val,test}/<class>/*.jpg)"),
    "vtab": Reader(
        lambda arg, opts: read_vtab(arg or "", trainval=opts.trainval),
        "vtab:DIR/TASK  (VTAB-1k jpg+txt layout: train800.txt, val200.txt, train800val200.txt, test.txt)"),
    "fgvc": Reader(
        lambda arg, opts: read_fgvc(arg or ""),
        "fgvc:DIR  (VPT FGVC layout: {train,val,test}.json, flat {relative_path: class_id})"),
    "hf": Reader(
        _read_hf, "hf:NAME_OR_PATH[:CONFIG]  (Hugging Face datasets: hub name, save_to_disk folder, parquet, imagefolder)"),
    "tv": Reader(_read_tv, "tv:NAME  (torchvision.datasets, e.g. tv:CIFAR100, tv:Flowers102; files under --data-root)"),
    "wds": Reader(
        _read_wds,
        "wds:DIR or wds:DIR/train-{000000..000127}.tar  (WebDataset shards {train,val,test}-*.tar + classes.json)"),
    "camvid": Reader(
        lambda arg, opts: read_camvid(arg or ""),
        "camvid:DIR  (segment: {train,val,test}/*.jpg + {split}annot/*.png class-index masks, optional classes.txt)",
        tasks=("segment",)),
    "voc": Reader(
        lambda arg, opts: read_voc(arg or ""),
        "voc:DIR  (detect: PASCAL VOC JPEGImages/, Annotations/*.xml, ImageSets/Main/{train,val,test}.txt)",
        tasks=("detect",)),
    "pennfudan": Reader(
        lambda arg, opts: read_pennfudan(arg or "", opts.split_seed),
        "pennfudan:DIR  (segment or detect: images/NAME.png + masks/NAME_mask.png instance masks, seeded 60/20/20 split)",
        tasks=("segment", "detect")),
}  # fmt: skip

_ALIASES = {
    "fashion_mnist": "fashion-mnist", "fashionmnist": "fashion-mnist", "image-folder": "folder",
    "huggingface": "hf", "torchvision": "tv", "webdataset": "wds",
}  # fmt: skip

#: The kinds vistune itself reads (:func:`register_reader` refuses to replace them).
BUILTIN_KINDS = frozenset(READERS)

#: kind -> one-line usage (a view of :data:`READERS`, kept in step by :func:`register_reader`; also
#: the list printed on an unknown kind).
KNOWN_KINDS: dict[str, str] = {kind: reader.usage for kind, reader in READERS.items()}

#: What a user's kind may be called: a spec is ``kind:argument`` (so no ``:``), matched case-insensitively.
_KIND_NAME = re.compile(r"[a-z][a-z0-9_-]{0,63}")


def register_reader(kind: str, reader: Reader) -> Reader:
    """Make ``kind:ARG`` specs readable by ``reader`` (a plugin's own layout, for its own task kind).

    Why here and not a private table of the plugin: every command (train, eval, sweep) reads a
    spec through :func:`parse_spec` and :func:`~vistune.data.loader.read_source`, so a registered
    kind gets the same one-line errors, task check (``reader.tasks``) and split handling as the
    built-in ones. A built-in kind or alias cannot be replaced; registering the same reader twice
    (a module imported again) is a no-op, another reader under a taken kind is refused.
    """
    if not isinstance(kind, str) or not _KIND_NAME.fullmatch(kind):
        raise DataError(f"register_reader: data kind {kind!r} is invalid: use 1-64 lower-case letters, digits, "
                        "'_' or '-', starting with a letter")
    if not isinstance(reader, Reader):
        raise DataError(f"register_reader({kind!r}): {reader!r} is not a vistune.data.Reader")
    if kind in BUILTIN_KINDS or kind in _ALIASES:
        raise DataError(f"data kind {kind!r} is built into vistune and cannot be replaced")
    held = READERS.get(kind)
    if held is not None and held != reader:
        raise DataError(f"data kind {kind!r} is registered twice ({held.usage!r} and {reader.usage!r}); "
                        "give one another name")
    READERS[kind] = reader
    KNOWN_KINDS[kind] = reader.usage
    return reader


def parse_spec(spec: str) -> tuple[str, str | None]:
    """Split ``"kind:argument"`` into ``(kind, argument)``.

    Only the first ``:`` separates, so paths may contain colons. The kind is
    case-insensitive. An unknown kind raises :class:`DataError` listing the
    known ones with their usage, since a typo'd spec is the most common
    first-run mistake and the message should say how to write it.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DataError(f"empty data spec {spec!r}; known kinds:\n" + kinds_help())
    kind, sep, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    kind = _ALIASES.get(kind, kind)
    if kind not in READERS:
        raise DataError(f"unknown data spec kind {kind!r} in {spec!r}, not one of the known kinds:\n" + kinds_help())
    arg = arg.strip() if sep else ""
    if not arg:
        if READERS[kind].needs_arg:
            raise DataError(f"data spec {spec!r} needs a path: {KNOWN_KINDS[kind]}")
        return kind, None
    return kind, arg


def kinds_help() -> str:
    return "\n".join(f"  {usage}" for usage in KNOWN_KINDS.values())


def check_task(kind: str, task: str | None, spec: str) -> None:
    """Refuse a spec whose reader cannot feed ``task`` (None: any task), naming what it serves."""
    served = READERS[kind].tasks
    if task is not None and task not in served:
        raise DataError(f"{kind}: data serves {'/'.join(served)}, not {task!r} (spec {spec!r})")
