"""The pure-PyTorch training core shared by expert finetuning (on Ray) and base pretraining (local).

One ``ExpertTrainer`` owns a student model, an optional frozen teacher, AdamW, the EMA of weights
and one ``torch.Generator`` that drives every random draw (images, noise, timesteps), so a
checkpoint of its state resumes the run exactly.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch import nn

from .data import ImageSet
from .errors import DemeError
from .model import copy_model
from .objective import TimestepSampler, deme_loss

ADAMW_BETAS = (0.95, 0.999)
ADAMW_WEIGHT_DECAY = 1e-6
GRAD_CLIP = 1.0
EMA_POWER = 0.75
STUDENT_FILE = "student.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "trainer_state.rank{rank}.pt"


@dataclass
class StepSettings:
    learning_rate: float
    batch_size: int
    consistency_weight: float
    ema_decay: float
    mixed_precision: bool = True
    cosine_decay_steps: int | None = None  # None: constant learning rate (DeMe's); else cosine to 0


def learning_rate_factor(decay_steps: int | None):
    if decay_steps is None:
        return lambda step: 1.0
    return lambda step: 0.5 * (1 + math.cos(math.pi * min(step, decay_steps) / decay_steps))


def pick_device(use_gpu: bool) -> torch.device:
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DemeError("use_gpu is set but this machine has no CUDA GPU: set decouple.use_gpu=false")
    return torch.device("cuda", torch.cuda.current_device())


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


class ExpertTrainer:
    """Trains ``model`` on ``images`` with the DeMe loss; ``wrap`` lets a caller add DDP."""

    def __init__(
        self,
        model: nn.Module,
        teacher: nn.Module | None,
        scheduler: DDPMScheduler,
        images: ImageSet,
        sampler: TimestepSampler,
        settings: StepSettings,
        seed: int,
        device: torch.device = torch.device("cpu"),
        wrap: Callable[[nn.Module], nn.Module] = lambda m: m,
    ):
        self.module = model.to(device)
        self.module.train()
        self.model = wrap(self.module)
        self.teacher = frozen(teacher.to(device)) if teacher is not None else None
        self.scheduler = scheduler
        self.images = images
        self.sampler = sampler
        self.settings = settings
        self.device = device
        self.optimizer = torch.optim.AdamW(
            self.module.parameters(),
            lr=settings.learning_rate,
            betas=ADAMW_BETAS,
            weight_decay=ADAMW_WEIGHT_DECAY,
        )
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_factor(settings.cosine_decay_steps)
        )
        self.ema = EMAModel(
            self.module.parameters(), decay=settings.ema_decay, use_ema_warmup=True, power=EMA_POWER
        )
        self.generator = torch.Generator().manual_seed(seed)
        self.step = 0

    def _autocast(self):
        if self.device.type == "cuda" and self.settings.mixed_precision:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def draw_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = self.generator
        indices = torch.randint(len(self.images), (self.settings.batch_size,), generator=g)
        x0 = self.images.batch(indices)
        noise = torch.randn(x0.shape, generator=g)
        t = self.sampler.sample(self.settings.batch_size, g)
        return x0.to(self.device), noise.to(self.device), t.to(self.device)

    def train_step(self) -> dict[str, float]:
        x0, noise, t = self.draw_batch()
        with self._autocast():
            parts = deme_loss(
                self.model, self.teacher, self.scheduler, x0, noise, t, self.settings.consistency_weight
            )
        loss = parts.total.item()
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at step {self.step + 1}")
        self.optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), GRAD_CLIP)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.step(self.module.parameters())
        self.step += 1
        metrics = {"step": self.step, "loss": loss, "denoise_loss": parts.denoise.item(), "time": time.time()}
        if parts.consistency is not None:
            metrics["consistency_loss"] = parts.consistency.item()
        return metrics

    def ema_model(self) -> nn.Module:
        """A copy of the student holding the EMA weights (what DeMe saves and merges)."""
        averaged = copy_model(self.module)
        self.ema.copy_to(averaged.parameters())
        return averaged

    def save_checkpoint(self, folder: Path, rank: int = 0) -> None:
        """Weights (identical on every DDP rank) come from rank 0; each rank adds its own RNG and
        optimiser state, so a multi-worker run resumes exactly too."""
        folder.mkdir(parents=True, exist_ok=True)
        if rank == 0:
            save_file({k: v.contiguous() for k, v in self.module.state_dict().items()}, folder / STUDENT_FILE)
            names = [name for name, _ in self.module.named_parameters()]
            save_file({n: p.contiguous() for n, p in zip(names, self.ema.shadow_params)}, folder / EMA_FILE)
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "ema_optimization_step": self.ema.optimization_step,
            "generator": self.generator.get_state(),
            "torch_rng": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        torch.save(state, folder / STATE_FILE.format(rank=rank))

    def load_checkpoint(self, folder: Path, rank: int = 0) -> None:
        self.module.load_state_dict(load_file(folder / STUDENT_FILE, device=str(self.device)))
        ema = load_file(folder / EMA_FILE, device=str(self.device))
        self.ema.shadow_params = [ema[name] for name, _ in self.module.named_parameters()]
        state_file = folder / STATE_FILE.format(rank=rank)
        if not state_file.is_file():
            raise DemeError(f"checkpoint {folder} has no state for worker rank {rank}: resume with the same "
                            "decouple.workers_per_expert as the interrupted run")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.ema.optimization_step = state["ema_optimization_step"]
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step = state["step"]


@torch.no_grad()
def range_loss(
    model: nn.Module,
    scheduler: DDPMScheduler,
    x0: torch.Tensor,
    lo: int,
    hi: int,
    seed: int = 0,
    batch_size: int = 256,
) -> float:
    """Mean denoising loss on ``x0`` with timesteps and noise fixed by ``seed`` (a comparable yardstick)."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = 0.0
    for start in range(0, len(x0), batch_size):
        chunk = x0[start : start + batch_size]
        noise = torch.randn(chunk.shape, generator=g)
        t = torch.randint(lo, hi, (len(chunk),), generator=g)
        parts = deme_loss(model, None, scheduler, chunk.to(device), noise.to(device), t.to(device), 0.0)
        total += parts.total.item() * len(chunk)
    model.train(was_training)
    return total / len(x0)
