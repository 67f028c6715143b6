"""The experiment config: one YAML file, validated by pydantic, with ``--set dotted.key=value`` overrides.

Unknown keys are errors with a did-you-mean; values are parsed as YAML data (``yaml.safe_load``),
never evaluated. The starter file written by ``deme-ray init`` is generated from the field
descriptions below, so it cannot drift from what the loader accepts.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSection(Section):
    base: str = Field(
        "bundled:digits",
        description="pretrained model: bundled:digits, a diffusers pipeline folder (model_index.json) "
        "or a bare UNet folder (config.json)",
    )


class DataSection(Section):
    train: str = Field(
        "bundled:digits",
        description="training images: bundled:digits or an image folder (searched recursively for png/jpg/jpeg/webp)",
    )
    resolution: int | None = Field(
        None, gt=0, description="image side in pixels; null = the UNet's sample_size"
    )
    held_out: float = Field(
        0.2, gt=0, lt=1, description="fraction of the images kept out of training, for FID (fixed split)"
    )


class DecoupleSection(Section):
    num_ranges: int | None = Field(
        None, ge=1, description="number of equal-width timestep ranges (one expert each); default 4"
    )
    boundaries: list[int] | None = Field(
        None, description="explicit range boundaries instead of num_ranges, e.g. [0, 250, 500, 1000]"
    )
    p_global: float = Field(
        0.3, ge=0, le=1, description="probability that a batch draws timesteps from all of [0, T)"
    )
    consistency_weight: float = Field(
        1.0, ge=0, description="lambda: weight of the consistency loss against the frozen pretrained model"
    )
    channel_projection: bool = Field(
        True, description="learnable C x C projections after every down, mid and up block"
    )
    steps: int = Field(200, ge=1, description="optimiser steps per expert")
    batch_size: int = Field(64, ge=1, description="images per step per worker")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (constant)")
    checkpoint_every: int = Field(50, ge=1, description="steps between checkpoints")
    workers_per_expert: int = Field(1, ge=1, description="Ray Train workers (DDP ranks) per expert")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker")
    use_gpu: bool = Field(False, description="train on GPUs (one per worker); fails fast if the cluster has none")
    mixed_precision: bool = Field(True, description="bf16 autocast when training on a GPU")
    ema_decay: float = Field(0.9999, ge=0, le=1, description="maximum EMA decay (warm-up EMA, power 0.75)")
    max_failures: int = Field(3, ge=0, description="restarts from the last checkpoint after a worker dies")
    storage_path: str | None = Field(
        None,
        description="Ray Train checkpoint storage; null = OUTPUT/checkpoints. Multi-node clusters need "
        "shared storage: s3://..., gs://... or the same NFS path on every node",
    )

    @field_validator("boundaries")
    @classmethod
    def _increasing(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return value
        if len(value) < 2:
            raise ValueError("needs at least two values, e.g. [0, 500, 1000]")
        if value[0] != 0:
            raise ValueError(f"must start at 0, got {value[0]}")
        for a, b in zip(value, value[1:]):
            if b <= a:
                raise ValueError(f"must be strictly increasing, but {b} follows {a}")
        return value

    @model_validator(mode="after")
    def _one_of_ranges(self) -> "DecoupleSection":
        if self.num_ranges is not None and self.boundaries is not None:
            raise ValueError("give decouple.num_ranges or decouple.boundaries, not both")
        return self


class SearchSection(Section):
    algorithm: Literal["optuna", "grid", "random"] = Field(
        "optuna", description="merge-weight search: optuna (TPE), grid (the paper's) or random"
    )
    trials: int = Field(24, ge=1, description="trials for optuna/random (grid: grid_points ** N)")
    bounds: list[float] = Field([0.0, 1.0], description="[low, high] of every merge coefficient")
    grid_points: int = Field(3, ge=2, description="values per coefficient for the grid search")
    fid_samples: int = Field(512, ge=16, description="images sampled per trial for its FID (top rung)")
    method: Literal["linear", "ties", "dare_linear", "dare_ties"] = Field(
        "linear", description="merge method: linear (the paper's), ties, dare_linear, dare_ties"
    )
    density: float = Field(0.5, gt=0, le=1, description="fraction of task-vector entries kept by ties/dare")
    early_stopping: bool = Field(True, description="ASHA: stop poor trials after FID at 1/4 and 1/2 of fid_samples")
    max_concurrent: int | None = Field(None, ge=1, description="trials at once; null = one per CPU")

    @field_validator("bounds")
    @classmethod
    def _ordered(cls, value: list[float]) -> list[float]:
        if len(value) != 2 or not value[0] < value[1]:
            raise ValueError("must be [low, high] with low < high, e.g. [0.0, 1.0]")
        return value


class EvaluateSection(Section):
    feature: str = Field(
        "bundled:digits", description="FID feature network: bundled:digits or inception (needs inception_weights)"
    )
    inception_weights: str | None = Field(None, description="local InceptionV3 weights file for feature: inception")
    sampler: Literal["ddim", "ddpm"] = Field("ddim", description="sampler for FID and sample grids")
    sampling_steps: int = Field(50, ge=1, description="denoising steps (DDIM default 50, eta 0)")
    eta: float = Field(0.0, ge=0, le=1, description="DDIM eta (0 = deterministic)")
    num_samples: int = Field(1000, ge=16, description="images per model for `deme-ray evaluate`")
    batch_size: int = Field(256, ge=1, description="images per sampling batch")


class ExperimentConfig(Section):
    seed: int = Field(0, description="seed of every random draw; the same seed gives the same run")
    output_dir: str = Field("runs/deme", description="where the run writes base/, experts/ and run.json")
    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    decouple: DecoupleSection = Field(default_factory=DecoupleSection)
    search: SearchSection = Field(default_factory=SearchSection)
    evaluate: EvaluateSection = Field(default_factory=EvaluateSection)


SECTIONS: dict[str, type[Section]] = {
    "": ExperimentConfig,
    "model": ModelSection,
    "data": DataSection,
    "decouple": DecoupleSection,
    "search": SearchSection,
    "evaluate": EvaluateSection,
}


def _describe(error: dict) -> str:
    where = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        *parent, key = [str(p) for p in error["loc"]]
        known = list(SECTIONS.get(".".join(parent), ExperimentConfig).model_fields)
        guess = difflib.get_close_matches(key, known, n=1)
        hint = f"did you mean {'.'.join(parent + [guess[0]])!r}?" if guess else f"known keys: {', '.join(known)}"
        return f"unknown config key {where!r}: {hint}"
    message = error["msg"].removeprefix("Value error, ")
    if not where:
        return message
    return f"{where}: {message} (got {error.get('input')!r})"


def validate(raw: dict[str, Any], source: str = "config") -> ExperimentConfig:
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], value parsed as a YAML scalar or flow collection)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item!r} is not of the form dotted.key=value, e.g. --set decouple.steps=20")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.problem})") from None
    return key.strip().split("."), value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for item in overrides:
        path, value = parse_override(item)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return raw


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist: create one with `deme-ray init {path}`")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must hold a mapping of config keys, not a {type(raw).__name__}")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config from ``path`` (or the embedded default when None) with ``overrides`` applied."""
    raw = read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "config"
    return validate(apply_overrides(raw, list(overrides or [])), source)


def starter_yaml() -> str:
    """A commented config holding every key at its default."""
    lines = ["# deme-ray experiment config. Every key is optional; shown at its default.",
             "# Check it with `deme-ray validate PATH`; override keys with --set dotted.key=value.", ""]
    defaults = ExperimentConfig().model_dump()
    for name, field in ExperimentConfig.model_fields.items():
        value = defaults[name]
        if isinstance(value, dict):
            lines.append(f"{name}:")
            for key, sub in SECTIONS[name].model_fields.items():
                lines.append(f"  # {sub.description}")
                lines.append(f"  {key}: {yaml.safe_dump(value[key], default_flow_style=True).strip().removesuffix('...').strip()}")
            lines.append("")
        else:
            lines.append(f"# {field.description}")
            lines.append(f"{name}: {yaml.safe_dump(value).strip().removesuffix('...').strip()}")
    return "\n".join(lines).rstrip() + "\n"
