"""Pretraining of the embedded default: a small DDPM on scikit-learn's bundled digits.

The base model DeMe finetunes must itself come from somewhere when there is no model hub; this
module trains it with the same training core (plain denoising loss on all of [0, T), no teacher,
no projections) until the loss on a fixed probe set stops improving, and writes a diffusers
pipeline folder (model_index.json, unet/, scheduler/) that ``DDPMPipeline.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from .data import load_images
from .model import atomic_directory, publish
from .objective import TimestepSampler
from .training import ExpertTrainer, StepSettings, range_loss

log = logging.getLogger(__name__)

DIGITS_RESOLUTION = 16
DIGITS_HELD_OUT = 0.2


def digits_unet() -> UNet2DModel:
    """0.69M parameters: three resolutions, attention only at 4x4 (fast on two CPU cores)."""
    return UNet2DModel(
        sample_size=DIGITS_RESOLUTION,
        in_channels=1,
        out_channels=1,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=16,
    )


@dataclass
class PretrainSettings:
    seed: int = 0
    batch_size: int = 128
    learning_rate: float = 1e-3
    ema_decay: float = 0.999
    max_steps: int = 4000
    eval_every: int = 200
    patience: int = 5
    min_improvement: float = 0.01


def pretrain_digits(
    out_dir: Path,
    settings: PretrainSettings = PretrainSettings(),
    on_eval: Callable[[dict], None] = lambda record: None,
) -> Path:
    """Train with a cosine learning-rate decay over ``max_steps`` until the EMA model's probe loss has
    not improved by ``min_improvement`` (relative) for ``patience`` evaluations, then write the
    pipeline folder and the loss curve beside it."""
    torch.manual_seed(settings.seed)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    images = load_images("bundled:digits", DIGITS_RESOLUTION, 1, DIGITS_HELD_OUT, "train")
    probe = images.all()[:512]
    T = scheduler.config.num_train_timesteps
    trainer = ExpertTrainer(
        digits_unet(),
        teacher=None,
        scheduler=scheduler,
        images=images,
        sampler=TimestepSampler(0, T, T, p_global=0.0),
        settings=StepSettings(
            settings.learning_rate, settings.batch_size, 0.0, settings.ema_decay,
            cosine_decay_steps=settings.max_steps,
        ),
        seed=settings.seed,
    )
    history, best, stale, started = [], float("inf"), 0, time.time()
    while trainer.step < settings.max_steps and stale < settings.patience:
        for _ in range(settings.eval_every):
            train_loss = trainer.train_step()["loss"]
        probe_loss = range_loss(trainer.ema_model(), scheduler, probe, 0, T, seed=1)
        record = {"step": trainer.step, "train_loss": train_loss, "probe_loss": probe_loss,
                  "seconds": round(time.time() - started, 1)}
        history.append(record)
        on_eval(record)
        if probe_loss < best * (1 - settings.min_improvement):
            best, stale = probe_loss, 0
        else:
            stale += 1
    tmp = atomic_directory(out_dir)
    try:
        DDPMPipeline(unet=trainer.ema_model().eval(), scheduler=scheduler).save_pretrained(tmp)
        plateaued = stale >= settings.patience
        (tmp / "pretrain_log.json").write_text(json.dumps(
            {"settings": asdict(settings), "plateaued": plateaued, "best_probe_loss": best, "history": history},
            indent=1))
        publish(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(out_dir)
