"""Dense prediction (semantic segmentation, object detection) on a frozen, tuned backbone.

The components: decoding with letterbox + flip (:mod:`.datasets`; the layouts are read, split and
capped by :mod:`vistune.data` like every data spec), multi-level features read
after the method's hooks (:mod:`.features`), necks and heads (:mod:`.heads`), reference metrics
(:mod:`.metrics`), the model and its files (:mod:`.model`), and drawing predictions
(:mod:`.predict`). Training is the engine's one loop with the ``segment``/``detect`` task
(:mod:`vistune.tasks.dense`): ``vistune train --task segment|detect``.

Data specs: ``camvid:PATH``, ``voc:PATH``, ``pennfudan:PATH`` (see :mod:`.datasets`).
"""

from vistune.dense.datasets import DenseSplits, load_dense_data
from vistune.dense.features import FeatureError, FeatureExtractor, Level, default_levels
from vistune.dense.heads import DenseHead, HeadConfig
from vistune.dense.metrics import DetectionMetric, SegmentationMetric
from vistune.dense.model import DenseModel, build_dense_model, head_config, is_dense_run, load_dense, save_dense
from vistune.dense.predict import predict

__all__ = [
    "DenseHead",
    "DenseModel",
    "DenseSplits",
    "DetectionMetric",
    "FeatureError",
    "FeatureExtractor",
    "HeadConfig",
    "Level",
    "SegmentationMetric",
    "build_dense_model",
    "default_levels",
    "head_config",
    "is_dense_run",
    "load_dense",
    "load_dense_data",
    "predict",
    "save_dense",
]
