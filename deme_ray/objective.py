"""The DeMe objective: timestep ranges, the probabilistic antithetic timestep sampler, and the loss.

L_i = || target - f_i(x_t, t) ||^2 + lambda * || f_teacher(x_t, t) - f_i(x_t, t) ||^2, both mean-reduced,
with the frozen pretrained model as teacher (``../shared/method.md``, section 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from .errors import ConfigError

TimestepRange = tuple[int, int]


def timestep_ranges(
    num_train_timesteps: int, num_ranges: int | None = None, boundaries: list[int] | None = None
) -> list[TimestepRange]:
    """Contiguous, non-overlapping ``[lo, hi)`` ranges that cover ``[0, T)``."""
    T = num_train_timesteps
    if boundaries is None:
        n = 4 if num_ranges is None else num_ranges
        if n < 1:
            raise ConfigError(f"decouple.num_ranges must be at least 1, got {n}")
        if n > T:
            raise ConfigError(f"decouple.num_ranges={n} is more than the model's {T} timesteps: use at most {T}")
        boundaries = [round(i * T / n) for i in range(n + 1)]
    else:
        if len(boundaries) < 2:
            raise ConfigError("decouple.boundaries needs at least two values, e.g. [0, 500, 1000]")
        if boundaries[0] != 0 or boundaries[-1] != T:
            raise ConfigError(
                f"decouple.boundaries must start at 0 and end at T={T} (the scheduler's num_train_timesteps), "
                f"got {boundaries[0]}..{boundaries[-1]}"
            )
        for a, b in zip(boundaries, boundaries[1:]):
            if b <= a:
                raise ConfigError(
                    f"decouple.boundaries must be strictly increasing, but {b} follows {a}: {list(boundaries)}"
                )
    return [(int(a), int(b)) for a, b in zip(boundaries, boundaries[1:])]


def range_name(r: TimestepRange) -> str:
    return f"{r[0]}_{r[1]}"


class TimestepSampler:
    """Draws a batch's timesteps as antithetic pairs from the expert's range, or (with probability
    ``p_global``, one coin per micro-batch) from all of ``[0, T)``: t pairs with lo+hi-1-t."""

    def __init__(self, lo: int, hi: int, num_train_timesteps: int, p_global: float):
        self.lo, self.hi, self.T, self.p_global = lo, hi, num_train_timesteps, p_global

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        use_global = torch.rand((), generator=generator).item() < self.p_global
        lo, hi = (0, self.T) if use_global else (self.lo, self.hi)
        half = torch.randint(lo, hi, ((batch_size + 1) // 2,), generator=generator)
        return torch.cat([half, lo + hi - 1 - half])[:batch_size]


def prediction_target(
    scheduler: DDPMScheduler, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor
) -> torch.Tensor:
    """What the model is trained to predict, as the scheduler defines it."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ConfigError(f"unsupported prediction_type {kind!r}: use epsilon, v_prediction or sample")


@dataclass
class LossParts:
    total: torch.Tensor
    denoise: torch.Tensor
    consistency: torch.Tensor | None


def deme_loss(
    student: nn.Module,
    teacher: nn.Module | None,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    consistency_weight: float,
) -> LossParts:
    """Denoising loss plus ``consistency_weight`` times the MSE to the frozen teacher's output."""
    x_t = scheduler.add_noise(x0, noise, t)
    pred = student(x_t, t).sample
    denoise = F.mse_loss(pred.float(), prediction_target(scheduler, x0, noise, t).float())
    if teacher is None or consistency_weight == 0:
        return LossParts(denoise, denoise.detach(), None)
    with torch.no_grad():
        reference = teacher(x_t, t).sample
    consistency = F.mse_loss(pred.float(), reference.float())
    return LossParts(denoise + consistency_weight * consistency, denoise.detach(), consistency.detach())
