"""``hf:NAME_OR_PATH[:CONFIG]`` — a data set of the Hugging Face ``datasets`` library.

Where the data comes from (first match wins):

* an existing local path: a ``save_to_disk`` folder (``dataset_dict.json`` or
  ``state.json`` inside; :func:`datasets.load_from_disk`), a ``.parquet``
  file, or any folder ``datasets.load_dataset`` understands (parquet files,
  an ``imagefolder`` tree ``split/class/*.jpg``, a downloaded hub snapshot);
  ``PATH:CONFIG`` passes a config name when ``PATH`` exists;
* otherwise a hub name, ``hf:NAME`` or ``hf:NAME:CONFIG`` (hub names never
  contain ``:``), loaded with :func:`datasets.load_dataset`: the library
  downloads and caches it, and reuses its cache offline (``HF_HUB_OFFLINE=1``
  skips the network attempts).

Columns: the image column is the first ``Image`` feature and the label column
the first ``ClassLabel`` feature (else a column named ``label``/``labels``),
unless ``image_column`` / ``label_column`` name them (``--image-column``,
``--label-column``). Class names come from the ``ClassLabel``; an integer
label column declares none, so the classes are the training labels'
(:func:`~vistune.data.sources.classes_from_train`); a string label column's
classes are the sorted distinct training values.

Splits: ``train``, ``validation``/``valid``/``val``/``dev`` and ``test`` are
used as given; the loader carves the missing ones by the usual rules. Other
splits are ignored (noted in the manifest). A split whose labels are all -1
(the hub's convention for an unlabelled test split) is dropped and carved
instead. Images are decoded by vistune (PIL, as for image files) only for
the rows the loader selects; the ``datasets`` library only reads the bytes.

``datasets`` is an optional dependency: ``pip install 'vistune[hf]'``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DataError
from .sources import ImageSource, RawSplit, SourceData, as_label, as_stored, classes_from_train
from .transforms import load_image_bytes, load_image_file, verify_image

INSTALL_HINT = "pip install 'vistune[hf]'  (or: pip install datasets)"
SPLIT_ALIASES = {"train": ("train",), "val": ("validation", "valid", "val", "dev"), "test": ("test",)}
LABEL_NAMES = ("label", "labels")


def _datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"hf: data specs need the Hugging Face `datasets` library: {INSTALL_HINT}") from None
    return datasets


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text[:300]}"


def _locate(arg: str) -> tuple[Path | None, str, str | None]:
    """``(local path or None, name, config)`` for a spec argument."""
    path = Path(arg).expanduser()
    if path.exists():
        return path, arg, None
    head, sep, tail = arg.rpartition(":")
    if sep and head and Path(head).expanduser().exists():
        return Path(head).expanduser(), head, tail or None
    if arg.startswith(("/", "./", "../", "~", ".\\")):
        raise DataError(f"hf: local path {path} does not exist")
    name, _, config = arg.partition(":")
    return None, name, config or None


def _load(arg: str) -> tuple[Any, str, list[str]]:
    """Load the dataset object; returns ``(DatasetDict or Dataset, root, notes)``."""
    ds_lib = _datasets()
    local, name, config = _locate(arg)
    try:
        if local is not None:
            root = str(local.resolve())
            if local.is_file():
                if local.suffix != ".parquet":
                    raise DataError(f"hf: {local} is a file but not .parquet; give a folder or a parquet file")
                return ds_lib.load_dataset("parquet", data_files={"train": str(local)}), root, ["one parquet file"]
            if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                return ds_lib.load_from_disk(str(local)), root, ["save_to_disk folder"]
            note = f"local folder read by datasets.load_dataset (config={config})"
            return ds_lib.load_dataset(str(local), config), root, [note]
        root = name if config is None else f"{name}:{config}"
        return ds_lib.load_dataset(name, config), root, [f"hub data set {root}"]
    except DataError:
        raise
    except ConnectionError as e:
        cache = ds_lib.config.HF_DATASETS_CACHE
        try:
            from huggingface_hub.constants import HF_HUB_CACHE as hub_cache
        except ImportError:  # pragma: no cover - huggingface_hub is a dependency of datasets
            hub_cache = "the Hugging Face hub cache"
        raise DataError(
            f"hf: {name!r} needs the network (the Hugging Face Hub cannot be reached: {_one_line(e)}) and is not "
            f"in the local cache; run once with network access to fill {cache} and {hub_cache} "
            "(or set HF_HOME to a filled cache), then it loads offline"
        ) from None
    except FileNotFoundError as e:
        raise DataError(f"hf: no data set {name!r} found ({_one_line(e)})") from None
    except Exception as e:  # the library's own errors: bad config name, unreadable files, ...
        raise DataError(f"hf: cannot load {arg!r}: {_one_line(e)}") from None


def _feature_kind(feature: Any) -> str:
    return type(feature).__name__


def _describe_features(features: Any) -> str:
    return ", ".join(f"{k}: {_feature_kind(v)}" + (f"({v.dtype})" if hasattr(v, "dtype") else "")
                     for k, v in features.items())  # fmt: skip


def _pick_columns(
    features: Any, image_column: str | None, label_column: str | None, where: str
) -> tuple[str, str, list[str]]:
    notes = []
    if image_column is not None:
        if image_column not in features:
            raise DataError(f"hf: {where}: no column {image_column!r} (columns: {_describe_features(features)})")
        if _feature_kind(features[image_column]) != "Image":
            raise DataError(
                f"hf: {where}: column {image_column!r} is {_feature_kind(features[image_column])}, not an Image "
                "feature (cast it with dataset.cast_column(name, datasets.Image()))"
            )
    else:
        images = [k for k, v in features.items() if _feature_kind(v) == "Image"]
        if not images:
            raise DataError(
                f"hf: {where}: no Image column (columns: {_describe_features(features)}); "
                "name the image column with --image-column"
            )
        image_column = images[0]
        if len(images) > 1:
            notes.append(f"image column {image_column!r} (also Image: {', '.join(images[1:])}; see --image-column)")
    if label_column is not None:
        if label_column not in features:
            raise DataError(f"hf: {where}: no column {label_column!r} (columns: {_describe_features(features)})")
    else:
        labels = [k for k, v in features.items() if _feature_kind(v) == "ClassLabel"]
        if not labels:
            labels = [k for k in features if k.lower() in LABEL_NAMES and _feature_kind(features[k]) == "Value"]
        if not labels:
            raise DataError(
                f"hf: {where}: no ClassLabel column and no 'label' column (columns: {_describe_features(features)}); "
                "name the label column with --label-column"
            )
        label_column = labels[0]
        if len(labels) > 1:
            notes.append(f"label column {label_column!r} (also: {', '.join(labels[1:])}; see --label-column)")
    if label_column == image_column:
        raise DataError(f"hf: {where}: the image and label columns are both {label_column!r}")
    return image_column, label_column, notes


class HFImages(ImageSource):
    """The image column of each split, read undecoded (``{bytes, path}``)
    and decoded here with PIL, addressed as ``"<split>:<row>"``."""

    def __init__(self, tables: dict[str, Any], column: str, hf_splits: dict[str, str], origin: str) -> None:
        self.tables = tables
        self.column = column
        self.hf_splits = hf_splits
        self.origin = origin

    def _cell(self, sample_id: str) -> dict[str, Any]:
        split, _, row = sample_id.rpartition(":")
        cell = self.tables[split][int(row)][self.column]
        if cell is None or (cell.get("bytes") is None and not cell.get("path")):
            raise ValueError("empty image cell")
        return cell

    def load(self, sample_id: str, size: int) -> np.ndarray:
        cell = self._cell(sample_id)
        if cell.get("bytes") is not None:
            return load_image_bytes(cell["bytes"], size)
        return load_image_file(Path(cell["path"]), size)

    def encoded(self, sample_id: str) -> tuple[bytes, str]:
        cell = self._cell(sample_id)
        return as_stored(cell["bytes"] if cell.get("bytes") is not None else Path(cell["path"]).read_bytes())

    def verify(self, sample_id: str, size: int) -> None:
        cell = self._cell(sample_id)
        verify_image(io.BytesIO(cell["bytes"]) if cell.get("bytes") is not None else Path(cell["path"]))

    def describe(self, sample_id: str) -> str:
        split, _, row = sample_id.rpartition(":")
        return f"{self.origin}[{self.hf_splits.get(split, split)}][{row}]"


def read_hf(arg: str, *, image_column: str | None = None, label_column: str | None = None) -> SourceData:
    """Read an ``hf:`` spec argument into ids + labels per split (see module docstring)."""
    if not arg:
        raise DataError("hf: the spec needs a hub name or a local path: hf:NAME_OR_PATH[:CONFIG]")
    ds_lib = _datasets()
    obj, root, notes = _load(arg)
    if isinstance(obj, ds_lib.Dataset):
        available = {"train": obj}
    elif isinstance(obj, ds_lib.DatasetDict):
        available = dict(obj)
    else:
        raise DataError(f"hf: {arg!r} loaded as {type(obj).__name__}; need a Dataset or DatasetDict (no streaming)")
    chosen: dict[str, str] = {}  # our split -> the data set's split name
    for ours, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in available:
                chosen[ours] = alias
                break
    if "train" not in chosen:
        raise DataError(f"hf: {root} has no 'train' split (splits: {', '.join(available) or 'none'})")
    ignored = sorted(set(available) - set(chosen.values()))
    if ignored:
        notes.append(f"splits ignored: {', '.join(ignored)}")
    origin = f"hf:{root}"
    features = available[chosen["train"]].features
    image_column, label_column, col_notes = _pick_columns(features, image_column, label_column, origin)
    notes += col_notes
    label_feature = features[label_column]
    is_classlabel = _feature_kind(label_feature) == "ClassLabel"
    dtype = str(getattr(label_feature, "dtype", ""))
    if not is_classlabel and _feature_kind(label_feature) != "Value":
        raise DataError(f"hf: {origin}: label column {label_column!r} is {_feature_kind(label_feature)}; need a single "
                        "class per image (ClassLabel, integer or string)")  # fmt: skip
    string_labels = not is_classlabel and "string" in dtype

    raw_labels: dict[str, list[Any]] = {}
    tables: dict[str, Any] = {}
    origins: dict[str, str] = {}
    for ours, theirs in list(chosen.items()):
        ds = available[theirs]
        for col in (image_column, label_column):
            if col not in ds.features:
                raise DataError(f"hf: {origin}: split {theirs!r} has no column {col!r}")
        where = f"{origin}[{theirs}]:{label_column}"
        values = list(ds.select_columns([label_column])[label_column])
        if values and all(v is None or (not isinstance(v, str) and v == -1) for v in values):
            if ours == "train":
                raise DataError(f"hf: {where}: the train split is unlabelled (every label is -1)")
            notes.append(f"split {theirs!r} is unlabelled (labels -1 or missing): not used")
            del chosen[ours]
            continue
        raw_labels[ours] = values
        origins[ours] = where
        tables[ours] = ds.select_columns([image_column]).cast_column(image_column, ds_lib.Image(decode=False))

    splits, class_names = _label_splits(raw_labels, origins, string_labels, label_feature, label_column, notes)
    notes.append("splits used: " + ", ".join(f"{ours}={theirs}" for ours, theirs in chosen.items()))
    source = HFImages(tables, image_column, chosen, origin)
    return SourceData("hf", root, source, splits, class_names, notes, origins=origins)


def _label_splits(raw_labels: dict[str, list[Any]], origins: dict[str, str], string_labels: bool,
                  label_feature: Any, label_column: str, notes: list[str]) -> tuple[dict[str, RawSplit], list[str]]:
    """Labels as class indices per split and the class names: sorted training values for string
    labels, a ClassLabel's names, else the classes the integer training labels use."""
    is_classlabel = _feature_kind(label_feature) == "ClassLabel"
    splits: dict[str, RawSplit] = {}
    if string_labels:
        class_names = sorted({str(v) for v in raw_labels["train"] if v is not None})
        index = {c: i for i, c in enumerate(class_names)}
        for ours, values in raw_labels.items():
            labels = []
            for row, v in enumerate(values):
                if v is None or str(v) not in index:
                    raise DataError(f"hf: {origins[ours]}: label {v!r} (row {row}) is not one of the training "
                                    f"split's {len(class_names)} label values")  # fmt: skip
                labels.append(index[str(v)])
            splits[ours] = RawSplit([f"{ours}:{i}" for i in range(len(values))], labels)
        notes.append(f"string labels: classes = the {len(class_names)} sorted training values")
    else:
        for ours, values in raw_labels.items():
            labels = [as_label(v, f"hf: {origins[ours]} (row {row})") for row, v in enumerate(values)]
            splits[ours] = RawSplit([f"{ours}:{i}" for i in range(len(values))], labels)
        if is_classlabel:
            class_names = [str(n) for n in label_feature.names]
            notes.append(f"classes from ClassLabel {label_column!r}")
        else:
            class_names = classes_from_train("hf", splits, origins)
            notes.append(f"integer labels without ClassLabel: {len(class_names)} classes from the training labels")
    return splits, class_names
