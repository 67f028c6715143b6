"""Resolving a config into what a run will do: the base model, the timestep ranges and the data.

Everything here is offline and checked before any Ray work starts, so `deme-ray validate` and
`deme-ray train` refuse bad input the same way and early.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import ExperimentConfig
from .data import ImageSet, load_images
from .errors import DemeError
from .model import BaseModel, load_base
from .objective import TimestepRange, timestep_ranges


@dataclass
class ExperimentPlan:
    config: ExperimentConfig
    base: BaseModel
    ranges: list[TimestepRange]
    resolution: int
    train_images: ImageSet

    @property
    def num_train_timesteps(self) -> int:
        return self.base.num_train_timesteps

    @property
    def num_train_images(self) -> int:
        return len(self.train_images)


def check_resolution(down_blocks: int, resolution: int, trained_at: int) -> None:
    factor = 2 ** (down_blocks - 1)
    if resolution % factor:
        raise DemeError(
            f"data.resolution={resolution} cannot pass through this UNet's {down_blocks} down blocks: "
            f"use a multiple of {factor} (the model was trained at {trained_at})"
        )


def plan_experiment(cfg: ExperimentConfig) -> ExperimentPlan:
    base = load_base(cfg.model.base, cfg.decouple.channel_projection)
    ranges = timestep_ranges(base.num_train_timesteps, cfg.decouple.num_ranges, cfg.decouple.boundaries)
    unet_config = base.unet.config
    resolution = cfg.data.resolution or unet_config.sample_size
    check_resolution(len(unet_config.down_block_types), resolution, unet_config.sample_size)
    images = load_images(cfg.data.train, resolution, unet_config.in_channels, cfg.data.held_out, "train")
    return ExperimentPlan(cfg, base, ranges, resolution, images)
