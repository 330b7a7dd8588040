"""``vistune robustness``: how a tuned classifier holds up under ImageNet-C corruptions, L∞ attacks
(FGSM, PGD) and other data sets of its classes.

:mod:`.corruptions` (the imagecorruptions package behind a narrow compatibility layer),
:mod:`.attacks` (ART on a pixel-space model), :mod:`.ood` (class maps), :mod:`.report` (the files).
The workflow that ties them to a run is :mod:`vistune.workflows.robustness`.
"""

from vistune.robustness.corruptions import COMMON, CORRUPTIONS, EXTRA, RobustnessError

__all__ = ["COMMON", "CORRUPTIONS", "EXTRA", "RobustnessError"]
