"""Backbones, channel-wise projections, and loading/saving models as diffusers folders.

A DeMe expert is the pretrained UNet plus a learnable C x C projection (bias-free 1x1 conv,
identity at init) on the main feature path after every down block, the mid block and every up
block. The projections are attached as a child ``channel_projection`` of each block and applied
by a forward hook, so every original tensor name is unchanged (task vectors line up with the
base) and the stock UNet ``forward`` runs as is.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from torch import nn

from .errors import DemeError

ASSETS_DIR = Path(__file__).parent / "assets"
BUNDLED_MODELS = {"bundled:digits": ASSETS_DIR / "digits-ddpm"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def _project_main_path(block: nn.Module, _inputs, output):
    """Forward hook: project the main hidden state; skip/residual tensors bypass the projection."""
    if isinstance(output, tuple):
        return (block.channel_projection(output[0]),) + tuple(output[1:])
    return block.channel_projection(output)


def identity_projection(channels: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(channels).view(channels, channels, 1, 1))
    return conv


def projection_widths(config) -> dict[str, int]:
    """Output channels of every down block, the mid block and every up block, read from the config."""
    widths = list(config.block_out_channels)
    out = {f"down_blocks.{i}": c for i, c in enumerate(widths)}
    if config.mid_block_type is not None:
        out["mid_block"] = widths[-1]
    out.update({f"up_blocks.{i}": c for i, c in enumerate(reversed(widths))})
    return out


def attach_channel_projections(unet: nn.Module) -> None:
    for name, channels in projection_widths(unet.config).items():
        block = unet.get_submodule(name)
        block.channel_projection = identity_projection(channels).to(unet.device)
        block.register_forward_hook(_project_main_path)


class ProjectedUNet2DModel(UNet2DModel):
    """A diffusers ``UNet2DModel`` with DeMe channel-wise projections.

    Same config keys as ``UNet2DModel`` (it round-trips through config.json), so a stock
    ``DDPMPipeline(unet=..., scheduler=...)`` accepts it and ``deme_ray.load_unet`` reloads it.
    """

    @functools.wraps(UNet2DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        attach_channel_projections(self)


def has_projections(model: nn.Module) -> bool:
    return any(name.endswith("channel_projection") for name, _ in model.named_modules())


def load_unet(path: str | os.PathLike) -> UNet2DModel:
    """Load a UNet folder written by deme-ray (or any diffusers UNet2DModel folder)."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise DemeError(f"{path} has no config.json: point at a diffusers UNet folder (config.json + safetensors)")
    class_name = json.loads(config_file.read_text()).get("_class_name", "UNet2DModel")
    cls = ProjectedUNet2DModel if class_name == ProjectedUNet2DModel.__name__ else UNet2DModel
    try:
        return cls.from_pretrained(path, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as exc:
        raise DemeError(f"cannot load the UNet in {path}: {str(exc).splitlines()[0]}") from exc


@dataclass
class BaseModel:
    """Where a pretrained model came from, and its UNet and noise scheduler."""

    source: str
    unet: UNet2DModel
    scheduler: SchedulerMixin

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def resolve_model_dirs(spec: str) -> tuple[Path, Path | None]:
    """(UNet folder, scheduler folder or None) for ``bundled:NAME``, a pipeline folder or a bare UNet folder."""
    if spec.startswith("bundled:"):
        if spec not in BUNDLED_MODELS:
            raise DemeError(f"unknown bundled model {spec!r}; choose one of {sorted(BUNDLED_MODELS)}")
        root = BUNDLED_MODELS[spec]
    else:
        root = Path(spec).expanduser()
    if not root.exists():
        raise DemeError(f"model.base {spec!r} does not exist: give a diffusers pipeline folder or a UNet folder")
    if (root / "model_index.json").is_file():
        scheduler_dir = root / "scheduler"
        return root / "unet", scheduler_dir if scheduler_dir.is_dir() else None
    if (root / "config.json").is_file():
        return root, root if (root / "scheduler_config.json").is_file() else None
    raise DemeError(
        f"model.base {spec!r} has neither model_index.json (pipeline folder) nor config.json (UNet folder)"
    )


def training_scheduler(scheduler_dir: Path | None) -> DDPMScheduler:
    """The DDPM noise schedule training uses: the model's own scheduler config, or DDPM defaults."""
    if scheduler_dir is None:
        return DDPMScheduler()
    return DDPMScheduler.from_pretrained(scheduler_dir)


def load_base(spec: str, channel_projection: bool) -> BaseModel:
    """The pretrained model, with identity projections when ``channel_projection`` is set."""
    unet_dir, scheduler_dir = resolve_model_dirs(spec)
    unet = load_unet(unet_dir)
    if channel_projection and not isinstance(unet, ProjectedUNet2DModel):
        unet = with_identity_projections(unet)
    elif not channel_projection and isinstance(unet, ProjectedUNet2DModel):
        raise DemeError(
            f"{spec} already carries channel projections: set decouple.channel_projection to true"
        )
    return BaseModel(source=spec, unet=unet, scheduler=training_scheduler(scheduler_dir))


def with_identity_projections(unet: UNet2DModel) -> ProjectedUNet2DModel:
    projected = ProjectedUNet2DModel.from_config(unet.config)
    missing, unexpected = projected.load_state_dict(unet.state_dict(), strict=False)
    assert not unexpected and all(k.endswith("channel_projection.weight") for k in missing)
    return projected.to(unet.device)


def copy_model(model: UNet2DModel) -> UNet2DModel:
    """A fresh model of the same class and config holding a copy of ``model``'s weights."""
    clone = type(model).from_config(model.config)
    clone.load_state_dict(model.state_dict())
    return clone.to(model.device)


def atomic_directory(final: Path):
    """A temp folder beside ``final``; call ``publish(tmp)`` to move it into place in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))


def publish(tmp: Path, final: Path) -> None:
    final = Path(final)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it owner-only; the published folder is an ordinary one
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def save_model_folder(unet: UNet2DModel, scheduler: SchedulerMixin, final: Path) -> Path:
    """Write a diffusers UNet folder (config.json + safetensors + scheduler_config.json) atomically."""
    tmp = atomic_directory(final)
    try:
        unet.save_pretrained(tmp, safe_serialization=True)
        scheduler.save_pretrained(tmp)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Path(final)
