"""Data sets for vistune: one spec string -> train/val/test datasets.

Specs: ``fashion-mnist[:DIR]``, ``npz:PATH``, ``folder:DIR``,
``vtab:DIR/TASK``, ``fgvc:DIR``, ``hf:NAME_OR_PATH[:CONFIG]`` (Hugging Face
``datasets``, optional extra ``hf``), ``tv:NAME`` (``torchvision.datasets``),
``wds:DIR`` (WebDataset shards, optional extra ``wds``), and the dense kinds ``camvid:DIR``,
``voc:DIR``, ``pennfudan:DIR`` (see :data:`KNOWN_KINDS`; one registry,
:mod:`vistune.data.registry`, says which task each kind feeds). Every classification load
returns a :class:`DataSplits` whose items are ``(FloatTensor[3,H,W], int)``
and whose :meth:`DataSplits.manifest` records exactly which samples went
where, so a run can be reproduced and audited. This package imports nothing
else from vistune, so the engine depends on it and not the reverse.
"""

from .errors import DataError
from .fashion_mnist import ENV_VAR as FASHION_MNIST_ENV_VAR
from .fewshot import fewshot_indices, longtail_counts, longtail_quota, proportional_quota, stratified_split
from .loader import (
    DataSplits,
    ImageDataset,
    ReadOptions,
    check_classes,
    complete_splits,
    load_data,
    read_source,
    select_dense,
)
from .registry import KNOWN_KINDS, READERS, Reader, parse_spec, register_reader
from .vtab import VTAB_NUM_CLASSES

__all__ = [
    "DataError",
    "DataSplits",
    "FASHION_MNIST_ENV_VAR",
    "ImageDataset",
    "KNOWN_KINDS",
    "READERS",
    "Reader",
    "ReadOptions",
    "VTAB_NUM_CLASSES",
    "check_classes",
    "complete_splits",
    "fewshot_indices",
    "load_data",
    "longtail_counts",
    "longtail_quota",
    "parse_spec",
    "proportional_quota",
    "read_source",
    "register_reader",
    "select_dense",
    "stratified_split",
]
