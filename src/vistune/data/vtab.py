"""``vtab:DIR/TASK`` — VTAB-1k in the SPT/NOAH jpg+txt layout.

``DIR/TASK/{train800,val200,train800val200,test}.txt`` with lines
``images/<split>/000000.jpg <label>``, paths relative to the task folder.
Protocol (as in SPT/NOAH ``--test`` and VPT's final runs):

* default: train = ``train800``, val = ``val200``, test = ``test``;
* ``trainval=True``: train = ``train800val200``, val = None, test = ``test``
  (hyper-parameters were already chosen on val200; the final run trains on
  all 1000 and reports test).

``num_classes`` comes from the VTAB class table (VPT ``DATA2CLS`` / SPT) when
the task folder has a known name, because a 1000-sample subset need not
contain every class (``max label + 1`` would undercount e.g. SUN397);
otherwise it is ``max label + 1`` over the *training* list, and a val/test
label above that is refused.
"""

from __future__ import annotations

from pathlib import Path

from .errors import DataError
from .sources import FileImages, RawSplit, SourceData, as_label, classes_from_train

#: Task-folder name -> number of classes (METHODS.md §6.1).
VTAB_NUM_CLASSES: dict[str, int] = {
    "cifar": 100, "caltech101": 102, "dtd": 47, "oxford_flowers102": 102, "oxford_iiit_pet": 37,
    "svhn": 10, "sun397": 397, "patch_camelyon": 2, "eurosat": 10, "resisc45": 45,
    "diabetic_retinopathy": 5, "clevr_count": 8, "clevr_dist": 6, "dmlab": 6, "kitti": 4,
    "dsprites_loc": 16, "dsprites_ori": 16, "smallnorb_azi": 18, "smallnorb_ele": 9,
}  # fmt: skip


def read_list(path: Path) -> RawSplit:
    """Parse one ``<relative path> <label>`` list; blank lines are ignored.

    The label is the last whitespace-separated field, so paths containing
    spaces still parse. Any other malformed line is a :class:`DataError`
    naming file and line number: a silently dropped line would change the
    1k-sample protocol.
    """
    if not path.is_file():
        raise DataError(f"vtab: split file {path} does not exist")
    ids: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            parts = line.rsplit(None, 1)
            if len(parts) != 2:
                raise DataError(f"vtab: {path}:{lineno}: expected '<image path> <label>', got {line!r}")
            ids.append(parts[0])
            labels.append(as_label(parts[1], f"vtab: {path}:{lineno}"))
    if not ids:
        raise DataError(f"vtab: split file {path} lists no images")
    return RawSplit(ids, labels)


def read_vtab(arg: str, *, trainval: bool) -> SourceData:
    task_dir = Path(arg).expanduser()
    if not task_dir.is_dir():
        raise DataError(f"vtab: task folder {task_dir} does not exist (spec is vtab:DIR/TASK)")
    task = task_dir.resolve().name
    files = {"train": "train800val200.txt", "test": "test.txt"} if trainval else {
        "train": "train800.txt", "val": "val200.txt", "test": "test.txt"}  # fmt: skip
    splits = {split: read_list(task_dir / name) for split, name in files.items()}
    origins = {split: str(task_dir / name) for split, name in files.items()}
    if task in VTAB_NUM_CLASSES:
        num_classes = VTAB_NUM_CLASSES[task]
        for split, name in files.items():
            for i, lab in enumerate(splits[split].labels):
                if lab >= num_classes:
                    raise DataError(
                        f"vtab: {task_dir / name}: label {lab} (entry {i + 1}) >= {num_classes}, "
                        f"the class count of VTAB task {task!r}"
                    )
        count_note = f"num_classes={num_classes} from the VTAB table"
    else:
        # A 1000-sample list may miss classes (gaps allowed); val/test labels
        # above the training range are refused.
        num_classes = len(classes_from_train("vtab", splits, origins, allow_gaps=True))
        count_note = f"unknown task name {task!r}: num_classes = max training label + 1 = {num_classes}"
    notes = ["VTAB-1k protocol: " + ", ".join(f"{s}={n}" for s, n in files.items()), count_note]
    return SourceData(
        "vtab", str(task_dir.resolve()), FileImages(task_dir), splits, [str(i) for i in range(num_classes)],
        notes, handled_trainval=True, fixed_splits=True, origins=origins,
    )
