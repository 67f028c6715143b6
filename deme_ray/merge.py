"""Merge experts into one model by task arithmetic: theta + sum_i w_i * (theta_i - theta).

One merge function covers the paper's ``linear`` merge and the usual variants (TIES, DARE):
a variant only chooses how each task vector is sparsified and whether a per-element sign is
elected (mergekit's parameterisation). Two entry points share it: ``merge_state_dicts`` for
the many in-memory merges of a weight search, and ``merge_folders``, which streams diffusers
UNet folders tensor by tensor so a merge holds about one model in memory.
"""

from __future__ import annotations

import hashlib
import math
import shutil
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal, Mapping, Sequence

import torch
from torch import Tensor

from .errors import DemeError
from .model import WEIGHTS_NAME, atomic_directory, publish
from .tensor_io import SafetensorsReader, SafetensorsWriter

CONFIG_NAME = "config.json"
SCHEDULER_CONFIG_NAME = "scheduler_config.json"
MODEL_CARD_NAME = "README.md"


@dataclass(frozen=True)
class MergeMethod:
    """A task-arithmetic variant: how task vectors are sparsified, and whether signs are elected.

    sparsify: ``none`` keeps every entry; ``magnitude`` keeps each tensor's top ``density``
    fraction by |tau| (TIES trim); ``random`` keeps each entry with probability ``density`` and
    rescales the kept ones by 1/density so the expectation is unchanged (DARE).

    sign_consensus (TIES): per element, elect the sign of the sum of the weighted sparsified
    task vectors, then take the disjoint mean: the weighted sum of the entries whose weighted
    sign agrees with the elected one, divided by the sum of their weights (mergekit's
    ``normalize``). An element with no agreeing entry (or a tied sum) stays at the base. Because
    of the division, the weights act relative to each other: one expert of weight 0.5 still
    contributes its whole task vector.
    """

    sparsify: Literal["none", "magnitude", "random"]
    sign_consensus: bool

    @property
    def uses_density(self) -> bool:
        return self.sparsify != "none"

    @property
    def uses_seed(self) -> bool:
        return self.sparsify == "random"


METHODS: dict[str, MergeMethod] = {
    "linear": MergeMethod(sparsify="none", sign_consensus=False),
    "ties": MergeMethod(sparsify="magnitude", sign_consensus=True),
    "dare_linear": MergeMethod(sparsify="random", sign_consensus=False),
    "dare_ties": MergeMethod(sparsify="random", sign_consensus=True),
}


def resolve_method(method: str | MergeMethod) -> MergeMethod:
    if isinstance(method, MergeMethod):
        return method
    if method not in METHODS:
        raise DemeError(f"unknown merge method {method!r}: choose one of {', '.join(METHODS)}")
    return METHODS[method]


def parse_weights(text: str) -> list[float]:
    """Merge weights from the CLI, e.g. ``"0.1,0.1,0.2,0.5"`` (low-t to high-t experts)."""
    weights = []
    for item in text.split(","):
        try:
            weights.append(float(item))
        except ValueError:
            raise DemeError(
                f"merge weight {item.strip()!r} in {text!r} is not a number: "
                "give comma-separated numbers like 0.1,0.1,0.2,0.5"
            ) from None
    return check_weights(weights, len(weights))


def check_weights(weights: Sequence[float], num_experts: int) -> list[float]:
    weights = [float(w) for w in weights]
    if len(weights) != num_experts:
        raise DemeError(
            f"got {len(weights)} merge weights for {num_experts} experts: give exactly one weight per expert"
        )
    for w in weights:
        if not math.isfinite(w):
            raise DemeError(f"merge weight {w} is not a finite number: give finite weights like 0.1,0.1,0.2,0.5")
    return weights


def check_density(density: float) -> float:
    if not 0 < density <= 1:
        raise DemeError(
            f"merge density {density} is outside (0, 1]: give the fraction of task-vector entries to keep, e.g. 0.5"
        )
    return float(density)


def _compute_dtype(base: Tensor) -> torch.dtype:
    """float32 for half-precision weights (so sums do not lose the small deltas); float64 stays."""
    return torch.promote_types(base.dtype, torch.float32)


def _tensor_seed(seed: int, name: str, expert_index: int) -> int:
    """A DARE seed per (seed, tensor, expert): the drop mask does not depend on tensor order."""
    digest = hashlib.sha256(f"{seed}\0{name}\0{expert_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _sparsify(
    task_vector: Tensor, method: MergeMethod, density: float, seed: int, name: str, expert_index: int
) -> Tensor:
    if method.sparsify == "none" or density >= 1:
        return task_vector
    if method.sparsify == "magnitude":
        keep_count = max(1, round(density * task_vector.numel()))
        kept = task_vector.abs().flatten().topk(keep_count).indices
        keep = torch.zeros(task_vector.numel(), dtype=torch.bool, device=task_vector.device)
        keep[kept] = True
        return task_vector * keep.view_as(task_vector)
    generator = torch.Generator().manual_seed(_tensor_seed(seed, name, expert_index))
    keep = torch.rand(task_vector.shape, generator=generator).to(task_vector.device) < density
    return task_vector * keep / density


def _add_task_vectors(
    base: Tensor,
    task_vectors: Iterable[tuple[int, Tensor]],
    weights: Sequence[float],
    method: MergeMethod,
    density: float,
    seed: int,
    name: str,
) -> Tensor:
    """base + merged delta, cast back to the base dtype. ``task_vectors`` yields (expert index, tau)
    for the nonzero-weight experts (DARE seeds by index, so skipping zero weights changes nothing);
    without sign election they are consumed one at a time, so a lazy iterable keeps one in memory."""
    merged = base.to(_compute_dtype(base), copy=True)
    sparse = ((i, _sparsify(tv, method, density, seed, name, i)) for i, tv in task_vectors)
    if not method.sign_consensus:
        for i, tv in sparse:
            merged.add_(tv, alpha=weights[i])
        return merged.to(base.dtype)
    sparse = dict(sparse)
    if not sparse:
        return merged.to(base.dtype)
    expert_weights = torch.tensor([weights[i] for i in sparse], dtype=merged.dtype, device=merged.device)
    expert_weights = expert_weights.view(-1, *([1] * base.dim()))
    weighted = torch.stack(list(sparse.values())) * expert_weights
    elected_sign = weighted.sum(dim=0).sign()
    agrees = weighted.sign() * elected_sign > 0
    agreeing_weight = (expert_weights * agrees).sum(dim=0)
    agreeing_sum = (weighted * agrees).sum(dim=0)
    merged += agreeing_sum / torch.where(agreeing_weight == 0, torch.ones_like(agreeing_weight), agreeing_weight)
    return merged.to(base.dtype)


def merge_tensor(
    base: Tensor,
    experts: Sequence[Tensor],
    weights: Sequence[float],
    method: str | MergeMethod = "linear",
    density: float = 0.5,
    seed: int = 0,
    name: str = "",
) -> Tensor:
    """Merge one tensor: base + sum_i w_i * tau_i under ``method``; ``name`` seeds DARE's drop mask.

    Non-float tensors (step counters, index buffers) are copied from the base, never merged.
    """
    method = resolve_method(method)
    weights = check_weights(weights, len(experts))
    density = check_density(density)
    if not base.is_floating_point():
        return base.clone()
    return _add_task_vectors(base, _deltas(base, experts, weights), weights, method, density, seed, name)


def _deltas(base: Tensor, experts: Iterable[Tensor], weights: Sequence[float]) -> Iterator[tuple[int, Tensor]]:
    """(i, theta_i - theta) for the nonzero-weight experts, computed as they are asked for."""
    compute = _compute_dtype(base)
    base_compute = base.to(compute)
    for i, (expert, w) in enumerate(zip(experts, weights)):
        if w != 0:
            yield i, expert.to(compute) - base_compute


def _shapes(state_dict: Mapping[str, Tensor]) -> dict[str, tuple]:
    return {name: tuple(t.shape) for name, t in state_dict.items()}


def _check_same_tensors(
    base_shapes: Mapping[str, tuple], expert_shapes: Mapping[str, tuple], expert: str, base: str
) -> None:
    """Task vectors only exist when both models have the same tensors with the same shapes."""
    missing = sorted(set(base_shapes) - set(expert_shapes))
    if missing:
        raise DemeError(f"{expert} lacks tensor {missing[0]!r} that {base} has: merge experts finetuned from this base")
    extra = sorted(set(expert_shapes) - set(base_shapes))
    if extra:
        raise DemeError(f"{expert} has tensor {extra[0]!r} that {base} lacks: merge experts finetuned from this base")
    for name in sorted(base_shapes):
        if tuple(expert_shapes[name]) != tuple(base_shapes[name]):
            raise DemeError(
                f"tensor {name!r} has shape {tuple(expert_shapes[name])} in {expert} "
                f"but {tuple(base_shapes[name])} in {base}: merge experts finetuned from this base"
            )


def task_vectors(base: Mapping[str, Tensor], experts: Sequence[Mapping[str, Tensor]]) -> list[dict[str, Tensor]]:
    """tau_i = theta_i - theta for every float tensor, computed once so each search trial only adds."""
    vectors = []
    for i, expert in enumerate(experts):
        _check_same_tensors(_shapes(base), _shapes(expert), f"expert {i}", "the base")
        vectors.append({
            name: expert[name].to(_compute_dtype(t)) - t.to(_compute_dtype(t))
            for name, t in base.items() if t.is_floating_point()
        })
    return vectors


def merge_state_dicts(
    base: Mapping[str, Tensor],
    task_vectors: Sequence[Mapping[str, Tensor]],
    weights: Sequence[float],
    method: str | MergeMethod = "linear",
    density: float = 0.5,
    seed: int = 0,
) -> dict[str, Tensor]:
    """The merged state dict from the base and precomputed task vectors (see ``task_vectors``)."""
    method = resolve_method(method)
    weights = check_weights(weights, len(task_vectors))
    density = check_density(density)
    float_shapes = {name: shape for name, shape in _shapes(base).items() if base[name].is_floating_point()}
    for i, vector in enumerate(task_vectors):
        _check_same_tensors(float_shapes, _shapes(vector), f"task vector {i}", "the base")
    merged = {}
    for name, tensor in base.items():
        if not tensor.is_floating_point():
            merged[name] = tensor.clone()
            continue
        active = ((i, vector[name]) for i, (vector, w) in enumerate(zip(task_vectors, weights)) if w != 0)
        merged[name] = _add_task_vectors(tensor, active, weights, method, density, seed, name)
    return merged


def _weights_file(folder: Path) -> Path:
    if not (folder / CONFIG_NAME).is_file():
        raise DemeError(
            f"{folder} has no {CONFIG_NAME}: point at a diffusers UNet folder ({CONFIG_NAME} + {WEIGHTS_NAME})"
        )
    weights_file = folder / WEIGHTS_NAME
    if not weights_file.is_file():
        raise DemeError(f"{folder} has no {WEIGHTS_NAME}: point at a diffusers UNet folder saved with safetensors")
    return weights_file


def model_card(
    base_dir: Path, expert_dirs: Sequence[Path], weights: Sequence[float],
    method: str, density: float, seed: int, fid: float | None,
) -> str:
    """README.md of a merged folder: enough to reproduce the merge and to know how good it is."""
    chosen = resolve_method(method)
    settings = [f"- Method: `{method}`"]
    if chosen.uses_density:
        settings.append(f"- Density: {density!r}")
    if chosen.uses_seed:
        settings.append(f"- Seed: {seed}")
    settings.append(f"- FID: {'not measured' if fid is None else f'{fid:.4f}'}")
    rows = [f"| {i} | `{d.resolve()}` | {w!r} |" for i, (d, w) in enumerate(zip(expert_dirs, weights))]
    return "\n".join([
        "---",
        "library_name: diffusers",
        "tags: [deme, task-arithmetic, merge]",
        "---",
        "# DeMe merged UNet",
        "",
        "theta_merged = theta + sum_i w_i * (theta_i - theta), merged by deme-ray.",
        "",
        f"- Base: `{base_dir.resolve()}`",
        *settings,
        f"- Weights: {','.join(repr(w) for w in weights)}",
        "",
        "| Expert | Folder | Weight |",
        "|---|---|---|",
        *rows,
        "",
    ])


def merge_folders(
    base_dir: str | Path,
    expert_dirs: Sequence[str | Path],
    weights: Sequence[float],
    out_dir: str | Path,
    method: str = "linear",
    density: float = 0.5,
    seed: int = 0,
    fid: float | None = None,
) -> Path:
    """Merge diffusers UNet folders into ``out_dir`` (config, scheduler config, weights, README.md).

    Every input is streamed one tensor at a time and checked against the base before anything is
    written; the output appears in one rename, so a failed merge leaves no partial folder.
    """
    chosen = resolve_method(method)
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    expert_dirs = [Path(d) for d in expert_dirs]
    weights = check_weights(weights, len(expert_dirs))
    density = check_density(density)
    inputs = [base_dir, *expert_dirs]
    if any(out_dir.resolve() == d.resolve() for d in inputs):
        raise DemeError(f"output folder {out_dir} is one of the merge inputs: choose a new folder")
    files = [_weights_file(d) for d in inputs]
    with ExitStack() as stack:
        readers = [stack.enter_context(SafetensorsReader(f)) for f in files]
        base_reader = readers[0]
        for reader in readers[1:]:
            _check_same_tensors(base_reader.shapes(), reader.shapes(), str(reader.path), str(base_reader.path))
        layout = [(name, dtype, shape) for name, (dtype, shape, _) in base_reader.entries.items()]
        tmp = atomic_directory(out_dir)
        try:
            with SafetensorsWriter(tmp / WEIGHTS_NAME, layout, metadata={"format": "pt"}) as writer:
                for name, _, _ in layout:
                    base = base_reader.read(name)
                    if base.is_floating_point():
                        # experts are read lazily, one at a time: zero-weight ones never
                        experts = (r.read(name) if w != 0 else None for r, w in zip(readers[1:], weights))
                        base = _add_task_vectors(
                            base, _deltas(base, experts, weights), weights, chosen, density, seed, name
                        )
                    writer.write(name, base)
            shutil.copyfile(base_dir / CONFIG_NAME, tmp / CONFIG_NAME)
            if (base_dir / SCHEDULER_CONFIG_NAME).is_file():
                shutil.copyfile(base_dir / SCHEDULER_CONFIG_NAME, tmp / SCHEDULER_CONFIG_NAME)
            card = model_card(base_dir, expert_dirs, weights, method, density, seed, fid)
            (tmp / MODEL_CARD_NAME).write_text(card)
            publish(tmp, out_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
