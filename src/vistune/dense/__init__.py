"""Dense prediction (semantic segmentation, object detection) on a frozen, tuned backbone.

Every tuning method works here: the method's modules and a light dense head train, the backbone
stays frozen. Entry points::

    train_dense(cfg, "segment" | "detect")    -> metrics; writes tuned.safetensors,
                                                 dense_head.safetensors, metrics.json
    evaluate_dense(run_dir, data_spec=None, split="test")
    predict(run_dir, image_path, out_png)      -> draws a mask overlay or boxes

Data specs: ``camvid:PATH``, ``voc:PATH``, ``pennfudan:PATH`` (see :mod:`.datasets`).
"""

from vistune.dense.datasets import DenseSplits, load_dense_data
from vistune.dense.features import FeatureError, FeatureExtractor, Level, default_levels
from vistune.dense.heads import DenseHead, HeadConfig
from vistune.dense.metrics import DetectionMetric, SegmentationMetric
from vistune.dense.model import DenseModel, build_dense_model, head_config, is_dense_run, load_dense, save_dense
from vistune.dense.predict import predict
from vistune.dense.train import evaluate_dense, evaluate_split, prepare_dense, train_dense

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
    "evaluate_dense",
    "evaluate_split",
    "head_config",
    "is_dense_run",
    "load_dense",
    "load_dense_data",
    "predict",
    "prepare_dense",
    "save_dense",
    "train_dense",
]
