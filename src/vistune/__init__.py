"""vistune: parameter-efficient tuning of frozen timm vision backbones.

Public API (re-exports only)::

    from vistune import create_backbone, attach, load_tuned
    model = create_backbone("vit_tiny_patch16_224", img_size=64, num_classes=10)
    tuned = attach(model, "lora", rank=8, targets="q,v")
    tuned.print_trainable_parameters()
    tuned.save_tuned("task.safetensors")
"""

__version__ = "0.1.0"

from vistune.backbones import create_backbone  # noqa: E402
from vistune.errors import MethodError, NotMergeableError, TunedFileError, VistuneError  # noqa: E402
from vistune.tuning import MethodSpec, TunedModel, attach, load_tuned  # noqa: E402

__all__ = [
    "MethodError",
    "MethodSpec",
    "NotMergeableError",
    "TunedFileError",
    "TunedModel",
    "VistuneError",
    "__version__",
    "attach",
    "create_backbone",
    "load_tuned",
]
