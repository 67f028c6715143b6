"""Shared fixtures: a private Ray instance (temporary HOME and temp dir, shut down afterwards) and
a tiny user-style model and image folder built locally with random weights (no download)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session; 2 CPUs so fractional workers of several experts fit."""
    import ray

    home = tempfile.mkdtemp(prefix="deme-home-")
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
    saved = {k: os.environ.get(k) for k in ("HOME", "RAY_TRAIN_ENABLE_STATE_TRACKING")}
    os.environ["HOME"] = home
    os.environ.pop("RAY_TRAIN_ENABLE_STATE_TRACKING", None)
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(temp, ignore_errors=True)


def tiny_unet(channels: int = 3, widths: tuple[int, int] = (8, 16), attention: bool = True) -> UNet2DModel:
    """A two-level 8 px UNet with random (seeded) weights: milliseconds per forward pass."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=widths,
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D" if attention else "DownBlock2D"),
        up_block_types=("AttnUpBlock2D" if attention else "UpBlock2D", "UpBlock2D"),
        norm_num_groups=widths[0] // 2,
        attention_head_dim=8,
    )


@pytest.fixture(scope="session")
def user_pipeline(tmp_path_factory) -> Path:
    """A user's own diffusers DDPM pipeline folder: RGB, 8 px, 100 training timesteps, v-prediction."""
    folder = tmp_path_factory.mktemp("user-model") / "pipeline"
    scheduler = DDPMScheduler(num_train_timesteps=100, prediction_type="v_prediction")
    DDPMPipeline(unet=tiny_unet(), scheduler=scheduler).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def user_images(tmp_path_factory) -> Path:
    """An image folder as users have them: nested, mixed sizes and modes, plus a non-image file."""
    folder = tmp_path_factory.mktemp("user-images")
    rng = np.random.default_rng(0)
    (folder / "nested").mkdir()
    for i in range(24):
        size = (12, 10) if i % 2 else (9, 9)
        array = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        image = Image.fromarray(array)
        if i % 3 == 0:
            image = image.convert("L")
        target = folder / ("nested" if i % 4 == 0 else ".") / f"img{i}.{'png' if i % 2 else 'jpg'}"
        image.save(target)
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Small models run no faster on two threads, and a second thread fights Ray's workers for the cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
