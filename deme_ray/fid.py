"""FID with pluggable feature networks, and the small digits classifier whose features it uses by default.

InceptionV3 features mean little on 16x16 greyscale digits (and its weights cannot be downloaded
here), so the default feature network is the penultimate layer of a small CNN trained by deme-ray
itself on the digits train split (``bundled:digits``). The committed asset was made with

    deme-ray pretrain-classifier --out deme_ray/assets/digits-classifier

i.e. ``train_digits_classifier(Path("deme_ray/assets/digits-classifier"), seed=0)`` with the
default settings; its config.json records the measured held-out accuracy.

Image ranges: the public functions here take images in [-1, 1] (what ``sample_images`` and
``ImageSet.batch`` give); feature networks take floats in [0, 1], the convention of torchmetrics'
``FrechetInceptionDistance(normalize=True)``. Reference statistics (mean and covariance of the
held-out images' features) are computed once and cached as safetensors keyed by everything
that determines them, including the sha256 of the feature network's weights file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .data import list_images, load_images, split_indices
from .errors import DemeError
from .model import ASSETS_DIR, atomic_directory, publish
from .pretrain import DIGITS_HELD_OUT, DIGITS_RESOLUTION
from .sampling import sample_images

log = logging.getLogger(__name__)

CLASSIFIER_DIR = ASSETS_DIR / "digits-classifier"
CLASSIFIER_WEIGHTS = "model.safetensors"
CLASSIFIER_CONFIG = "config.json"
REGENERATE_CLASSIFIER = "deme-ray pretrain-classifier --out deme_ray/assets/digits-classifier"
FEATURE_SPECS = ("bundled:digits", "inception")
INCEPTION_FILE_HINT = "pt_inception-2015-12-05-6726825d.pth, the file torch-fidelity uses"
CACHE_ENV = "DEME_RAY_CACHE"
CACHE_FORMAT = 1


# ---------------------------------------------------------------- the digits classifier


class DigitsClassifier(nn.Module):
    """Three 3x3 conv layers (two 2x2 max-pools) and a ``feature_dim`` layer before the logits;
    takes 16x16 greyscale images in [0, 1]."""

    def __init__(self, channels: tuple[int, int, int] = (16, 32, 64), feature_dim: int = 128, num_classes: int = 10):
        super().__init__()
        c1, c2, c3 = channels
        self.channels, self.feature_dim, self.num_classes = list(channels), feature_dim, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(4 * c3, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def architecture(self) -> dict[str, Any]:
        return {"channels": self.channels, "feature_dim": self.feature_dim, "num_classes": self.num_classes}

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def digits_labels(held_out: float, split: str) -> torch.Tensor:
    """Class labels in the same order as ``load_images("bundled:digits", ..., held_out, split)``."""
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, held = split_indices(len(target), held_out)
    return torch.from_numpy(target[{"train": train, "held_out": held}[split]]).long()


def digits_split(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [0, 1], labels) of a split of the bundled digits at the classifier's resolution."""
    images = load_images("bundled:digits", DIGITS_RESOLUTION, 1, DIGITS_HELD_OUT, split).all()
    return unit_range(images), digits_labels(DIGITS_HELD_OUT, split)


def random_shifts(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to ``max_shift`` pixels in x and y, zero-filled: digits drawn off-centre."""
    size = images.shape[-1]
    padded = F.pad(images, [max_shift] * 4)
    offsets = torch.randint(0, 2 * max_shift + 1, (images.shape[0], 2), generator=generator).tolist()
    return torch.stack([padded[i, :, dy:dy + size, dx:dx + size] for i, (dy, dx) in enumerate(offsets)])


@torch.no_grad()
def classifier_accuracy(classifier: DigitsClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    classifier.eval()
    return (classifier(images).argmax(1) == labels).float().mean().item()


def train_digits_classifier(
    out_dir: str | os.PathLike,
    seed: int = 0,
    *,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    max_shift: int = 1,
    min_accuracy: float = 0.97,
) -> Path:
    """Train on the digits train split, measure held-out accuracy, write model.safetensors +
    config.json atomically; fails (writing nothing) below ``min_accuracy``. Runs on one thread:
    the net is too small to gain from more threads, which contend badly on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        classifier, accuracy, settings = fit_digits_classifier(seed, epochs, batch_size, learning_rate, max_shift)
    finally:
        torch.set_num_threads(threads)
    if accuracy < min_accuracy:
        raise DemeError(f"the digits classifier reached {accuracy:.2%} held-out accuracy, below {min_accuracy:.0%}: "
                        "train longer (more epochs)")
    config = {
        "architecture": classifier.architecture(),
        "resolution": DIGITS_RESOLUTION,
        "input": "greyscale, values in [0, 1]",
        "held_out_fraction": DIGITS_HELD_OUT,
        "held_out_accuracy": round(accuracy, 5),
        "training": settings,
        "regenerate": REGENERATE_CLASSIFIER,
    }
    tmp = atomic_directory(Path(out_dir))
    try:
        save_file({k: v.contiguous() for k, v in classifier.state_dict().items()}, tmp / CLASSIFIER_WEIGHTS)
        (tmp / CLASSIFIER_CONFIG).write_text(json.dumps(config, indent=1) + "\n")
        publish(tmp, Path(out_dir))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(out_dir)


def fit_digits_classifier(
    seed: int, epochs: int, batch_size: int, learning_rate: float, max_shift: int
) -> tuple[DigitsClassifier, float, dict[str, Any]]:
    """Adam with a cosine learning-rate decay and random shifts; returns (classifier, held-out accuracy, settings)."""
    started = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = digits_split("train")
    classifier = DigitsClassifier()
    optimizer = torch.optim.Adam(classifier.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=epochs * math.ceil(len(train_labels) / batch_size)
    )
    for _ in range(epochs):
        classifier.train()
        for batch in torch.randperm(len(train_labels), generator=generator).split(batch_size):
            inputs = random_shifts(train_images[batch], max_shift, generator)
            loss = F.cross_entropy(classifier(inputs), train_labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    accuracy = classifier_accuracy(classifier, *digits_split("held_out"))
    settings = {"seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
                "max_shift": max_shift, "train_images": len(train_labels), "threads": 1,
                "seconds": round(time.time() - started, 1)}
    return classifier, accuracy, settings


def load_digits_classifier(folder: str | os.PathLike = CLASSIFIER_DIR) -> DigitsClassifier:
    folder = Path(folder)
    if not (folder / CLASSIFIER_CONFIG).is_file() or not (folder / CLASSIFIER_WEIGHTS).is_file():
        raise DemeError(f"{folder} holds no digits classifier (config.json + {CLASSIFIER_WEIGHTS}): "
                        f"regenerate it with `{REGENERATE_CLASSIFIER}`")
    architecture = json.loads((folder / CLASSIFIER_CONFIG).read_text())["architecture"]
    classifier = DigitsClassifier(tuple(architecture["channels"]), architecture["feature_dim"],
                                  architecture["num_classes"])
    classifier.load_state_dict(load_file(folder / CLASSIFIER_WEIGHTS))
    return classifier.eval()


# ---------------------------------------------------------------- feature networks


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1]."""
    return (images.float().clamp(-1, 1) + 1) / 2


class DigitsFeatures(nn.Module):
    """The classifier's penultimate activations; RGB is turned grey and any size resized to 16x16."""

    def __init__(self, classifier: DigitsClassifier, weights_file: Path):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.feature_dim
        self.weights_file = weights_file

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        if x.shape[-2:] != (DIGITS_RESOLUTION, DIGITS_RESOLUTION):
            x = F.interpolate(x, size=(DIGITS_RESOLUTION, DIGITS_RESOLUTION), mode="bilinear",
                              align_corners=False, antialias=True)
        return self.classifier.features(x)


class InceptionFeatures(nn.Module):
    """torchmetrics' (torch-fidelity's) InceptionV3 pool features (2048) from local weights;
    greyscale is repeated to RGB and [0, 1] floats become the uint8 it expects."""

    num_features = 2048

    def __init__(self, weights_file: Path):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        try:
            self.inception = NoTrainInceptionV3(
                name="inception-v3-compat", features_list=[str(self.num_features)],
                feature_extractor_weights_path=str(weights_file),
            )
        except (OSError, RuntimeError, KeyError, ValueError) as exc:
            raise DemeError(f"cannot load InceptionV3 weights from {weights_file} ({INCEPTION_FILE_HINT}): "
                            f"{str(exc).splitlines()[0]}") from exc
        self.weights_file = weights_file

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return self.inception((x * 255).round().clamp(0, 255).to(torch.uint8))


def feature_weights_file(spec: str, weights_path: str | os.PathLike | None = None) -> Path:
    """The weights file behind a feature spec (checked to exist), without loading the network."""
    if spec == "bundled:digits":
        return CLASSIFIER_DIR / CLASSIFIER_WEIGHTS
    if spec != "inception":
        raise DemeError(f"unknown FID feature network {spec!r}: use one of {', '.join(FEATURE_SPECS)}")
    if weights_path is None or not Path(weights_path).expanduser().is_file():
        where = "no file was given" if weights_path is None else f"{weights_path} does not exist"
        raise DemeError(f"feature 'inception' needs a local InceptionV3 weights file ({INCEPTION_FILE_HINT}) and "
                        f"{where}: pass it as evaluate.inception_weights=/path/to/weights.pth (nothing is downloaded)")
    return Path(weights_path).expanduser().resolve()


def feature_network(spec: str, weights_path: str | os.PathLike | None = None) -> nn.Module:
    """``bundled:digits`` (the committed classifier; ``weights_path`` is not used) or ``inception``
    (InceptionV3 from the local file ``weights_path``). The module has ``num_features`` and ``weights_file``."""
    weights_file = feature_weights_file(spec, weights_path)
    if spec == "bundled:digits":
        return DigitsFeatures(load_digits_classifier(weights_file.parent), weights_file)
    if importlib.util.find_spec("torch_fidelity") is None:
        raise DemeError("feature 'inception' needs torch-fidelity: pip install torch-fidelity")
    return InceptionFeatures(weights_file)


@functools.lru_cache(maxsize=16)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file, remembered while its size and mtime stay the same (search scores many times)."""
    stat = Path(path).stat()
    return _sha256_of(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


# ---------------------------------------------------------------- statistics and FID


@dataclass
class ReferenceStats:
    """Mean and covariance (float64) of the held-out images' features, and what computed them."""

    feature: str
    weights_sha256: str
    mean: torch.Tensor
    cov: torch.Tensor
    num_samples: int


def frechet_metric(network: nn.Module) -> FrechetInceptionDistance:
    return FrechetInceptionDistance(feature=network, normalize=True, reset_real_features=False)


def feature_statistics(
    images: torch.Tensor, network: nn.Module, batch_size: int = 256, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean, covariance, count) of the features of images in [-1, 1], accumulated by torchmetrics."""
    if images.shape[0] < 2:
        raise DemeError(f"FID statistics need at least 2 images, got {images.shape[0]}")
    metric = frechet_metric(network).to(device or "cpu")
    with torch.no_grad():
        for batch in images.split(batch_size):
            metric.update(unit_range(batch).to(metric.device), real=True)
    n = int(metric.real_features_num_samples)
    mean = metric.real_features_sum / n
    cov = (metric.real_features_cov_sum - n * torch.outer(mean, mean)) / (n - 1)
    return mean.cpu(), cov.cpu(), n


def data_identity(images_spec: str) -> Any:
    """What the held-out images depend on: the spec, or a folder's path and its image files' names, sizes, mtimes."""
    folder = Path(images_spec).expanduser()
    if images_spec.startswith("bundled:") or not folder.is_dir():
        return images_spec
    listing = hashlib.sha256()
    for path in list_images(folder):
        stat = path.stat()
        listing.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {"folder": str(folder.resolve()), "files": listing.hexdigest()}


def reference_key(images_spec: str, resolution: int, channels: int, held_out: float, feature_spec: str,
                  weights_sha256: str) -> str:
    payload = {"format": CACHE_FORMAT, "data": data_identity(images_spec), "resolution": resolution,
               "channels": channels, "held_out": held_out, "feature": feature_spec, "weights_sha256": weights_sha256}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "deme-ray") / "fid-reference"


def read_cached_stats(path: Path) -> ReferenceStats | None:
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as handle:
            meta = handle.metadata()
        return ReferenceStats(meta["feature"], meta["weights_sha256"], tensors["mean"], tensors["cov"],
                              int(meta["num_samples"]))
    except (OSError, KeyError, ValueError, SafetensorError) as exc:
        log.warning("ignoring unreadable FID reference cache %s: %s", path, exc)
        return None


def write_cached_stats(stats: ReferenceStats, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"feature": stats.feature, "weights_sha256": stats.weights_sha256, "num_samples": str(stats.num_samples)}
    save_file({"mean": stats.mean.contiguous(), "cov": stats.cov.contiguous()}, tmp, metadata=meta)
    os.replace(tmp, path)


def reference_stats(
    images_spec: str,
    resolution: int,
    channels: int,
    held_out: float,
    feature_spec: str = "bundled:digits",
    inception_weights: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> ReferenceStats:
    """Feature statistics of the held-out images, read from ``cache_dir`` (default
    $DEME_RAY_CACHE or ~/.cache/deme-ray, under fid-reference/) or computed and written there."""
    weights_sha256 = file_sha256(feature_weights_file(feature_spec, inception_weights))
    key = reference_key(images_spec, resolution, channels, held_out, feature_spec, weights_sha256)
    path = Path(cache_dir or default_cache_dir()).expanduser() / f"reference-{key[:24]}.safetensors"
    if path.is_file():
        cached = read_cached_stats(path)
        if cached is not None:
            return cached
    images = load_images(images_spec, resolution, channels, held_out, "held_out").all()
    mean, cov, n = feature_statistics(images, feature_network(feature_spec, inception_weights), batch_size, device)
    stats = ReferenceStats(feature_spec, weights_sha256, mean, cov, n)
    write_cached_stats(stats, path)
    return stats


def fid_score(
    generated_images: torch.Tensor,
    reference: ReferenceStats,
    feature_spec: str = "bundled:digits",
    inception_weights: str | os.PathLike | None = None,
    *,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """FID of images in [-1, 1] against ``reference``: torchmetrics' FrechetInceptionDistance with
    the reference's sums loaded as its real-image state."""
    if generated_images.shape[0] < 2:
        raise DemeError(f"FID needs at least 2 generated images, got {generated_images.shape[0]}")
    network = feature_network(feature_spec, inception_weights)
    if reference.feature != feature_spec or reference.weights_sha256 != file_sha256(network.weights_file):
        raise DemeError(f"the reference statistics were computed with feature {reference.feature!r} "
                        f"(weights sha256 {reference.weights_sha256[:12]}), not with {feature_spec!r} and "
                        f"{network.weights_file}: recompute them with reference_stats")
    metric = frechet_metric(network).to(device or "cpu")
    n, mean = reference.num_samples, reference.mean.double().to(metric.device)
    metric.real_features_sum = mean * n
    metric.real_features_cov_sum = reference.cov.double().to(metric.device) * (n - 1) + n * torch.outer(mean, mean)
    metric.real_features_num_samples = torch.tensor(n, device=metric.device)
    with torch.no_grad():
        for batch in generated_images.split(batch_size):
            metric.update(unit_range(batch).to(metric.device), real=False)
        return float(metric.compute())


def evaluate_fid(
    model: nn.Module,
    scheduler_config: Mapping[str, Any],
    num_samples: int,
    seed: int,
    reference: ReferenceStats,
    inception_weights: str | os.PathLike | None = None,
    *,
    steps: int = 50,
    eta: float = 0.0,
    sampler: str = "ddim",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> float:
    """Sample ``num_samples`` images (images 0.. of ``seed``, as every model gets) and score them
    with the reference's own feature network."""
    images = sample_images(model, scheduler_config, num_samples, steps=steps, eta=eta, sampler=sampler, seed=seed,
                           batch_size=batch_size, device=device)
    return fid_score(images, reference, reference.feature, inception_weights, batch_size=batch_size, device=device)
