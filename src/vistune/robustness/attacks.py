"""L∞ FGSM and PGD through IBM's adversarial-robustness-toolbox (ART), on pixels in [0, 1].

Why ART: a maintained implementation with few dependencies (numpy, scipy, scikit-learn, tqdm);
``torchattacks`` 3.5.1 pins ``requests~=2.25.1`` and downgrades what ``datasets`` needs. Why the
:class:`PixelModel` wrapper: eps is defined in pixel space (``8/255`` means 8 grey levels), so the
attack must see ``[0, 1]`` images and the model's mean/std normalisation belongs *inside* the
model, where the gradient flows through it. Attacks run in fp32 by default: the input gradient of
a bf16 forward is coarse enough to weaken the attack, so a lower robust number would be an
artefact. Robust accuracy counts an image only when it is right both clean and attacked (the
RobustBench convention), so it can never exceed the clean accuracy of the same images.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch
from torch import nn

from vistune.robustness.corruptions import RobustnessError

ATTACKS = ("fgsm", "pgd")
INSTALL_HINT = "pip install 'vistune[robustness]' (or: pip install adversarial-robustness-toolbox)"


def parse_attacks(text: str) -> list[str]:
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in ATTACKS]
    if unknown or not names:
        raise RobustnessError(f"--attack: unknown attack {(unknown or [text])[0]!r}; valid: {', '.join(ATTACKS)}")
    return list(dict.fromkeys(names))


def parse_eps(text: str) -> list[float]:
    """``1/255,2/255,0.03``: fractions or floats, each in (0, 1] (L∞ in [0, 1] pixel space)."""
    values = []
    for part in str(text).split(","):
        part = part.strip()
        try:
            value = float(Fraction(part))
        except (ValueError, ZeroDivisionError):
            raise RobustnessError(f"--eps: {part!r} is not a number or fraction (e.g. 8/255 or 0.03)") from None
        if not 0 < value <= 1:
            raise RobustnessError(f"--eps: {part} is outside (0, 1]; eps is an L∞ radius in [0, 1] pixel space")
        values.append(value)
    return sorted(set(values))


class PixelModel(nn.Module):
    """``[0, 1]`` pixels ``(N, 3, H, W)`` -> logits (fp32), normalising inside the graph.

    ``autocast`` is the forward's precision context (fp32 for attacks unless asked otherwise).
    """

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.autocast = autocast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model((x - self.mean) / self.std).float()


def art_classifier(model: PixelModel, num_classes: int, img_size: int, device: torch.device):
    """ART's PyTorch estimator around ``model``; pixels clipped to [0, 1], no extra preprocessing."""
    try:
        from art.estimators.classification import PyTorchClassifier
    except ImportError as err:
        raise RobustnessError(f"--attack needs the adversarial-robustness-toolbox package ({err}); "
                              f"{INSTALL_HINT}") from None
    logging.getLogger("art").setLevel(logging.ERROR)  # its info lines would interleave with ours
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # ART places its tensors on the *current* CUDA device
    return PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(3, img_size, img_size),
                             nb_classes=num_classes, clip_values=(0.0, 1.0),
                             device_type="gpu" if device.type == "cuda" else "cpu")


def make_attack(name: str, estimator, eps: float, steps: int, alpha: float | None, batch_size: int):
    """Untargeted L∞ FGSM (one step of size eps) or PGD (``steps`` of ``alpha``, one random start)."""
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent

    if name == "fgsm":
        return FastGradientMethod(estimator, norm=np.inf, eps=eps, eps_step=eps, targeted=False,
                                  batch_size=batch_size, minimal=False)
    step = pgd_alpha(eps, steps, alpha)
    return ProjectedGradientDescent(estimator, norm=np.inf, eps=eps, eps_step=step, max_iter=steps,
                                    targeted=False, num_random_init=1, batch_size=batch_size, verbose=False)


def pgd_alpha(eps: float, steps: int, alpha: float | None) -> float:
    """The PGD step: given, or 2.5·eps/steps (Madry et al.'s choice: enough to cross the ball)."""
    return float(alpha) if alpha is not None else 2.5 * eps / steps


def attack_batch(attack, x: torch.Tensor, y: torch.Tensor, seed: int) -> np.ndarray:
    """Adversarial ``[0, 1]`` images for one batch of uint8 images; seeded (PGD's random start)."""
    np.random.seed(seed)
    torch.manual_seed(seed)
    pixels = x.float().div(255.0)
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    return attack.generate(x=pixels.contiguous().numpy(), y=y.numpy())


@torch.no_grad()
def predict(model: PixelModel, pixels: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Predicted classes of ``[0, 1]`` images (CPU tensor)."""
    x = torch.as_tensor(pixels, dtype=torch.float32, device=device)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return model(x).argmax(1).cpu()
