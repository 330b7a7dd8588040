"""ImageNet-C corruptions (Hendrycks & Dietterich 2019) through the ``imagecorruptions`` package.

Why ``imagecorruptions`` and a compatibility layer: it is the reference implementation (what
mmdetection's robustness benchmark calls), so numbers made here mean what the literature means.
Its last release (1.1.2, 2020) no longer imports on a current stack, and a re-implementation would
drift from the reference in ways nobody checks. So :func:`load_imagecorruptions` imports it
unchanged and repairs, *inside that one module only*, exactly four things:

* ``from pkg_resources import resource_filename`` (setuptools >= 81 ships no ``pkg_resources``):
  a stand-in module is visible only while the package imports, and ``resource_filename`` is
  replaced by a path next to the package's own files (the frost pictures);
* ``skimage.filters.gaussian(..., multichannel=True)`` (removed in scikit-image 0.19+): the
  module's ``gaussian`` translates it to ``channel_axis=-1`` (gaussian_blur, glass_blur);
* ``np.float_`` (removed in NumPy 2): the module sees a NumPy whose ``float_`` is ``float64`` (fog);
* ``skimage.util.random_noise`` draws from a fresh, unseeded generator unless given ``rng``: the
  module's copy takes its ``rng`` from NumPy's global state, so seeding makes impulse_noise
  reproducible like the other 18.

One more repair is of the output, in :func:`corrupt`: spatter (severities 1-3) divides by the
largest drop value, which is 0 when no drop survives its threshold (about 1 in 40 images at
32 px): the reference returns an all-NaN image, which ``np.uint8`` turns into platform-dependent
bytes. There is no spatter on such an image, so NaN pixels keep their clean value.

Nothing outside ``imagecorruptions.corruptions`` changes (no global NumPy or scikit-image patch).
Every corruption draws from NumPy's global generator; :func:`corrupt` seeds it per image from
``(seed, corruption, severity, image id)`` so a rerun, in any DataLoader worker, gives identical bytes.
"""

from __future__ import annotations

import contextlib
import sys
import types
import warnings
import zlib
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from vistune.errors import VistuneError

#: The 15 ImageNet-C test corruptions, in the paper's order (noise, blur, weather, digital).
COMMON = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
          "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
          "jpeg_compression")
#: The 4 extra ("validation") corruptions of ImageNet-C.
EXTRA = ("speckle_noise", "gaussian_blur", "spatter", "saturate")
CORRUPTIONS = COMMON + EXTRA
SEVERITIES = (1, 2, 3, 4, 5)
#: imagecorruptions refuses smaller images (its frost and zoom crops assume it).
MIN_SIZE = 32
INSTALL_HINT = "pip install 'vistune[robustness]' (or: pip install imagecorruptions)"
#: Revision of the repairs below; part of every corruption cell's stamp, so a fix recomputes old cells.
LAYER_REVISION = 2


class RobustnessError(VistuneError, ValueError):
    """Bad robustness settings: an unknown corruption/attack, an eps or severity out of range, a bad map."""


def parse_corruptions(text: str) -> list[str]:
    """``all`` (the 19), ``common`` (the 15), ``extra`` (the 4) or ``NAME,NAME``; unknown names list the valid ones."""
    text = (text or "").strip()
    groups = {"all": CORRUPTIONS, "common": COMMON, "extra": EXTRA}
    if text in groups:
        return list(groups[text])
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CORRUPTIONS]
    if unknown or not names:
        raise RobustnessError(f"--corruptions: unknown corruption {(unknown or [text])[0]!r}; valid: all, common, "
                              f"extra or any of {', '.join(CORRUPTIONS)}")
    return list(dict.fromkeys(names))


def parse_severities(text: str) -> list[int]:
    """``1,2,3,4,5``-style list; each an integer in 1..5 (ImageNet-C defines no others)."""
    out = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = int(part)
        except ValueError:
            raise RobustnessError(f"--severities: {part!r} is not an integer; use values in 1..5") from None
        if value not in SEVERITIES:
            raise RobustnessError(f"--severities: {value} is outside 1..5 (ImageNet-C's five severities)")
        out.append(value)
    return sorted(set(out))


class _Namespace(types.SimpleNamespace):
    """A module seen through a few replaced attributes; everything else is the module's own."""

    def __init__(self, module: Any, **overrides: Any) -> None:
        super().__init__(**overrides)
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


def _gaussian(gaussian: Any) -> Any:
    def compat(image: Any, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> Any:
        if multichannel:
            kwargs.setdefault("channel_axis", -1)
        return gaussian(image, *args, **kwargs)

    return compat


def _random_noise(random_noise: Any) -> Any:
    def seeded(image: Any, *args: Any, rng: Any = None, **kwargs: Any) -> Any:
        if rng is None:
            rng = int(np.random.randint(0, 2**31 - 1))
        return random_noise(image, *args, rng=rng, **kwargs)

    return seeded


@contextlib.contextmanager
def _pkg_resources_stand_in():
    """A ``pkg_resources`` module for the duration of one import, when the real one is absent."""
    try:
        import pkg_resources  # noqa: F401
        yield
        return
    except ImportError:
        pass
    stub = types.ModuleType("pkg_resources")
    stub.resource_filename = lambda package, name: name  # replaced right after the import
    sys.modules["pkg_resources"] = stub
    try:
        yield
    finally:
        if sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


@lru_cache(maxsize=1)
def load_imagecorruptions() -> Any:
    """The ``imagecorruptions.corruptions`` module with the four repairs above applied to it."""
    try:
        with warnings.catch_warnings(), _pkg_resources_stand_in():
            warnings.simplefilter("ignore")  # pkg_resources/scipy deprecation notes: not the user's concern
            import imagecorruptions.corruptions as ic
    except ImportError as err:
        raise RobustnessError(f"--corruptions needs the imagecorruptions package ({err}); {INSTALL_HINT}") from None
    import skimage.filters
    import skimage.util

    here = Path(ic.__file__).parent
    ic.resource_filename = lambda package, name: str(here / name)
    ic.np = _Namespace(np, float_=np.float64)
    ic.gaussian = _gaussian(skimage.filters.gaussian)
    ic.sk = _Namespace(ic.sk, util=_Namespace(skimage.util, random_noise=_random_noise(skimage.util.random_noise)))
    return ic


def implementation() -> dict[str, Any]:
    """What a corrupted image depends on besides its inputs: the package's and the layer's versions."""
    return {"imagecorruptions": version("imagecorruptions"), "layer": LAYER_REVISION}


def image_seed(seed: int, name: str, severity: int, image_id: str) -> int:
    """A 32-bit seed for one (corruption, severity, image): independent of batch, worker and order."""
    return zlib.crc32(f"{seed}|{name}|{severity}|{image_id}".encode()) & 0x7FFFFFFF


def corrupt(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """One ``uint8 (C, H, W)`` image (C 1 or 3) corrupted -> ``uint8 (3, H, W)``, seeded by ``seed``.

    Rounded like imagecorruptions' own ``corrupt`` (``np.uint8`` of the clipped float result).
    """
    if name not in CORRUPTIONS or severity not in SEVERITIES:
        raise RobustnessError(f"unknown corruption {name!r} or severity {severity!r}")
    ic = load_imagecorruptions()
    hwc = np.ascontiguousarray(np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image).transpose(1, 2, 0)
    if min(hwc.shape[:2]) < MIN_SIZE:
        raise RobustnessError(f"corruptions need images of at least {MIN_SIZE} px; the model sees {hwc.shape[0]} px")
    from PIL import Image

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        with np.errstate(invalid="ignore", divide="ignore"):
            out = np.asarray(getattr(ic, name)(Image.fromarray(np.ascontiguousarray(hwc)), severity), np.float64)
    finally:
        np.random.set_state(state)
    if out.ndim == 3 and np.isnan(out).any():  # spatter's 0/0 when no drop survives: no spatter there
        out = np.where(np.isnan(out), hwc, out)
    out = np.uint8(out)
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out.transpose(2, 0, 1))
