"""Sampling with common random numbers, the timestep-routed ensemble (paper Eq. 7), and image grids.

Every image's noise (the initial x_T and any per-step noise) comes from its own generator seeded
from ``(seed, image index)``, so two models sampled with the same seed see identical noise and
FID differences between them are not sampling luck; the result does not depend on the batch size
either, so a search can sample images k..k+n later and get what one bigger run would have.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from .errors import DemeError
from .objective import TimestepRange

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}


class EnsembleUNet(nn.Module):
    """One expert per timestep range: each batch element is denoised by the expert whose
    ``[lo, hi)`` holds its timestep. N times the weights of one UNet, the same compute per step."""

    def __init__(self, experts: Sequence[tuple[TimestepRange, nn.Module]]):
        super().__init__()
        if not experts:
            raise DemeError("an ensemble needs at least one (timestep range, UNet) pair")
        ordered = sorted(experts, key=lambda pair: pair[0][0])
        ranges = [(int(lo), int(hi)) for (lo, hi), _ in ordered]
        if ranges[0][0] != 0:
            raise DemeError(f"ensemble ranges must start at timestep 0, got {ranges}")
        empty = any(hi <= lo for lo, hi in ranges)
        if empty or any(hi != next_lo for (_, hi), (next_lo, _) in zip(ranges, ranges[1:])):
            raise DemeError(f"ensemble ranges must be non-empty and contiguous (no gap, no overlap), got {ranges}")
        first = ordered[0][1].config
        for _, unet in ordered[1:]:
            for key in ("sample_size", "in_channels", "out_channels"):
                if unet.config[key] != first[key]:
                    raise DemeError(f"ensemble experts disagree on {key}: {unet.config[key]} vs {first[key]}")
        self.ranges = ranges
        self.experts = nn.ModuleList(unet for _, unet in ordered)
        self.config = first

    @property
    def num_train_timesteps(self) -> int:
        return self.ranges[-1][1]

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, return_dict: bool = True):
        t = torch.as_tensor(timestep, device=sample.device).long()
        if t.numel() == 1:
            t = t.reshape(()).expand(sample.shape[0])
        if t.shape != (sample.shape[0],):
            raise DemeError(f"timestep must be a scalar or one per batch element, got shape {tuple(t.shape)}")
        if t.min() < 0 or t.max() >= self.num_train_timesteps:
            raise DemeError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t.min()}..{t.max()}")
        out = None
        for (lo, hi), expert in zip(self.ranges, self.experts):
            chosen = ((t >= lo) & (t < hi)).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            part = expert(sample[chosen], t[chosen]).sample
            if out is None:
                out = part.new_empty((sample.shape[0],) + part.shape[1:])
            out[chosen] = part
        return UNet2DOutput(sample=out) if return_dict else (out,)


def image_generators(seed: int, first_index: int, count: int) -> list[torch.Generator]:
    """One CPU generator per image, seeded from (seed, image index) alone."""
    generators = []
    for index in range(first_index, first_index + count):
        state = np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0]
        generators.append(torch.Generator().manual_seed(int(state)))
    return generators


def make_scheduler(sampler: str, scheduler_config: Mapping[str, Any], steps: int, eta: float):
    if sampler not in SCHEDULERS:
        raise DemeError(f"sampler {sampler!r} is unknown: use ddim or ddpm")
    if steps < 1:
        raise DemeError(f"sampling steps must be at least 1, got {steps}")
    if sampler == "ddpm" and eta != 0.0:
        raise DemeError("eta applies to the ddim sampler only: leave it at 0 for ddpm")
    scheduler = SCHEDULERS[sampler].from_config(dict(scheduler_config))
    T = scheduler.config.num_train_timesteps
    if steps > T:
        raise DemeError(f"{steps} sampling steps is more than the model's {T} training timesteps")
    scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_batch(model: nn.Module, scheduler, generators: list[torch.Generator], eta: float,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    config = model.config
    shape = (len(generators), config.in_channels, config.sample_size, config.sample_size)
    x = randn_tensor(shape, generator=generators, device=device, dtype=dtype) * scheduler.init_noise_sigma
    step_kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        output = model(model_input, t.to(device)).sample
        x = scheduler.step(output, t, x, generator=generators, **step_kwargs).prev_sample
    return x.clamp(-1, 1).float().cpu()


def sample_images(
    model: nn.Module,
    scheduler_config: Mapping[str, Any],
    num_images: int,
    *,
    steps: int = 50,
    eta: float = 0.0,
    sampler: str = "ddim",
    seed: int = 0,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    first_index: int = 0,
) -> torch.Tensor:
    """Images ``first_index .. first_index+num_images-1`` of the run ``seed``, in [-1, 1], shape (N, C, R, R), on CPU."""
    if num_images < 0 or first_index < 0 or seed < 0:
        raise DemeError(f"num_images, first_index and seed must be >= 0, got {num_images}, {first_index}, {seed}")
    if batch_size < 1:
        raise DemeError(f"batch_size must be at least 1, got {batch_size}")
    scheduler = make_scheduler(sampler, scheduler_config, steps, eta)
    T = scheduler.config.num_train_timesteps
    if isinstance(model, EnsembleUNet) and model.num_train_timesteps != T:
        raise DemeError(f"the ensemble's ranges cover [0, {model.num_train_timesteps}) but the scheduler has {T} timesteps")
    parameter = next(model.parameters())
    device = torch.device(device) if device is not None else parameter.device
    model.to(device).eval()
    config = model.config
    batches = []
    for start in range(first_index, first_index + num_images, batch_size):
        count = min(batch_size, first_index + num_images - start)
        batches.append(sample_batch(model, scheduler, image_generators(seed, start, count), eta, device, parameter.dtype))
    if not batches:
        return torch.empty((0, config.in_channels, config.sample_size, config.sample_size))
    return torch.cat(batches)


def save_grid(images: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, padding: int = 2) -> Path:
    """Write images in [-1, 1] as one PNG, ``nrow`` images per row (default: a square), black
    ``padding`` pixels between and around tiles; written under a temp name, then renamed."""
    if images.ndim != 4 or images.shape[0] == 0 or images.shape[1] not in (1, 3):
        raise DemeError(f"save_grid needs (N, 1 or 3, H, W) images with N >= 1, got shape {tuple(images.shape)}")
    n, channels, height, width = images.shape
    per_row = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / per_row)
    grid = torch.zeros(channels, rows * (height + padding) + padding, per_row * (width + padding) + padding,
                       dtype=torch.uint8)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    for i, image in enumerate(pixels):
        top = padding + (i // per_row) * (height + padding)
        left = padding + (i % per_row) * (width + padding)
        grid[:, top:top + height, left:left + width] = image
    array = grid.permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[:, :, 0] if channels == 1 else array)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
