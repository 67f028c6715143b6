"""Training and held-out images: the bundled scikit-learn digits or a user's image folder.

Images are decoded once into a uint8 tensor at the training resolution; batches are drawn by
index with the expert's own ``torch.Generator`` so a run is reproducible from its seed.
The split into train and held-out parts uses a fixed seed, independent of the experiment seed,
so the held-out images are the same in every run (and were never seen by the bundled base).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from .errors import DemeError

log = logging.getLogger(__name__)

SPLIT_SEED = 20250611
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}
MAX_BAD_FRACTION = 0.10


@dataclass
class ImageSet:
    """Images as uint8 ``(N, C, R, R)``; ``batch`` returns floats in [-1, 1]."""

    pixels: torch.Tensor
    source: str

    def __len__(self) -> int:
        return self.pixels.shape[0]

    @property
    def channels(self) -> int:
        return self.pixels.shape[1]

    @property
    def resolution(self) -> int:
        return self.pixels.shape[-1]

    def batch(self, indices: torch.Tensor) -> torch.Tensor:
        return self.pixels[indices].float() / 127.5 - 1.0

    def all(self) -> torch.Tensor:
        return self.batch(torch.arange(len(self)))


def split_indices(n: int, held_out: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, held-out) indices from a fixed permutation: held-out is its first ceil(f*n) entries."""
    order = np.random.default_rng(SPLIT_SEED).permutation(n)
    k = int(np.ceil(held_out * n))
    if k < 1 or k >= n:
        raise DemeError(f"data.held_out={held_out} leaves no train or no held-out images out of {n}")
    return np.sort(order[k:]), np.sort(order[:k])


def digits_pixels(resolution: int, channels: int) -> torch.Tensor:
    """scikit-learn's 1797 bundled 8x8 digits, upsampled (bilinear) to ``resolution``, as uint8."""
    from sklearn.datasets import load_digits

    images = torch.from_numpy(load_digits().images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", align_corners=False)
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return pixels.expand(-1, channels, -1, -1).contiguous()


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, resolution: int, channels: int) -> torch.Tensor:
    """Decode, convert to L or RGB, resize the short side to ``resolution`` and centre-crop."""
    with Image.open(path) as img:
        img = img.convert("L" if channels == 1 else "RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
        w, h = img.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        array = np.asarray(img, dtype=np.uint8).reshape(resolution, resolution, -1)
    return torch.from_numpy(array.copy()).permute(2, 0, 1)


def folder_pixels(folder: Path, resolution: int, channels: int) -> torch.Tensor:
    if not folder.is_dir():
        raise DemeError(f"data.train {str(folder)!r} does not exist: give an image folder or bundled:digits")
    files = list_images(folder)
    if not files:
        raise DemeError(f"no images (png, jpg, jpeg, webp) found under {folder}: check data.train")
    images, bad = [], []
    for path in files:
        try:
            images.append(load_image(path, resolution, channels))
        except (OSError, UnidentifiedImageError, ValueError):
            bad.append(path)
    if len(bad) > MAX_BAD_FRACTION * len(files):
        raise DemeError(
            f"{len(bad)} of {len(files)} images under {folder} are unreadable (first: {bad[0]}); "
            f"fix or remove them (at most {MAX_BAD_FRACTION:.0%} may be bad)"
        )
    if bad:
        log.warning("skipped %d unreadable image(s) under %s (first: %s)", len(bad), folder, bad[0])
    return torch.stack(images)


def load_images(spec: str, resolution: int, channels: int, held_out: float, split: str) -> ImageSet:
    """The ``train`` or ``held_out`` part of ``bundled:digits`` or an image folder."""
    if spec == "bundled:digits":
        pixels = digits_pixels(resolution, channels)
    elif spec.startswith("bundled:"):
        raise DemeError(f"unknown bundled data set {spec!r}; use bundled:digits or an image folder")
    else:
        pixels = folder_pixels(Path(spec).expanduser(), resolution, channels)
    train, held = split_indices(pixels.shape[0], held_out)
    chosen = {"train": train, "held_out": held}[split]
    return ImageSet(pixels[torch.from_numpy(chosen)], source=f"{spec}:{split}")
