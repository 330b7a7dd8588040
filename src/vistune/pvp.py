"""PVP: pre-trained visual parameter-efficient tuning.

Stage 1 trains a method's modules on source data with the backbone frozen; stage 2 starts
downstream (few-shot) tuning from those modules instead of from their random/zero init. The
module file is the spine's tuned-file format, so the same checks apply: the backbone
fingerprint must match, the method must match, and every module tensor must have the shape
the target expects. The head never transfers (the target has other classes).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from vistune.errors import TunedFileError
from vistune.tuning import MethodSpec, TunedModel, attach, check_backbone, fingerprint, load_tensors, read_tuned_file


def attach_from_pretrained(
    backbone: nn.Module,
    method: str,
    path: str | os.PathLike,
    num_classes: int,
    options: dict[str, Any] | None = None,
) -> TunedModel:
    """Attach ``method`` to ``backbone`` with its modules initialised from the file at ``path``.

    Options recorded in the file define the module shapes; options given here may only repeat
    them (a different rank or prompt length would not fit the pre-trained tensors and is refused
    with the offending key named). The head is new, for ``num_classes``.
    """
    meta, tensors = read_tuned_file(path)
    fp = fingerprint(backbone)
    check_backbone(path, meta, backbone, fp)
    file_spec = MethodSpec.from_dict(meta["method"])
    if file_spec.name != method:
        raise TunedFileError(
            f"--init-from {path}: the file holds {file_spec.name!r} modules, but the method is {method!r}"
        )
    attached = attach(backbone, MethodSpec(method, {**file_spec.options, **(options or {})}),
                      num_classes=num_classes, state=tensors, base_fingerprint=fp)
    for key, value in file_spec.options.items():
        mine = attached.spec.options.get(key)
        if mine != value:
            raise TunedFileError(
                f"--init-from {path}: option {key}={mine!r} differs from the pre-trained modules' "
                f"{key}={value!r}"
            )
    load_tensors(attached, tensors, path, include_head=False)
    return attached
