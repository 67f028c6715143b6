"""Merge-weight search with Ray Tune: a thin outer loop around merge -> sample -> FID.

Every trial merges in memory from the base and the task vectors (shared once through the object
store with ``tune.with_parameters``), samples with the same noise seeds as every other trial
(common random numbers), and reports FID at 1/4, 1/2 and all of ``search.fid_samples`` images so
ASHA can stop poor trials early. Trials launch nothing else, so ordinary CPU/GPU trial resources
cannot deadlock.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search import BasicVariantGenerator
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import load_file
from safetensors.torch import save as save_safetensors_bytes

from .cluster import ray_session
from .config import ExperimentConfig, SearchSection
from .errors import DemeError
from .fid import ReferenceStats, fid_score, reference_stats
from .merge import merge_folders, merge_state_dicts, task_vectors
from .model import WEIGHTS_NAME, load_unet
from .run_record import TrainedRun, load_run, write_json_atomic
from .sampling import sample_images

log = logging.getLogger(__name__)

SEARCH_DIR = "search"
MERGED_DIR = "merged"


def coefficient_names(n: int) -> list[str]:
    return [f"w{i}" for i in range(n)]


def fid_rungs(fid_samples: int, early_stopping: bool) -> list[int]:
    """Sample counts at which a trial reports FID: 1/4, 1/2 and all (only the last without ASHA)."""
    if not early_stopping:
        return [fid_samples]
    return sorted({max(16, fid_samples // 4), max(16, fid_samples // 2), fid_samples})


@dataclass
class TrialContext:
    """What every trial needs, put in the object store once."""

    class_name: str
    unet_config: dict[str, Any]
    scheduler_config: dict[str, Any]
    base: bytes
    task_vectors: list[bytes]
    reference: ReferenceStats
    cfg: dict[str, Any]
    rungs: list[int]


def score_weights(context: TrialContext, weights: list[float], report=None) -> float:
    """Merge in memory with ``weights``, sample at each rung (same seeds for every trial), return
    the last FID; ``report(fid, samples)`` is called at each rung."""
    cfg = ExperimentConfig.model_validate(context.cfg)
    base = load_safetensors_bytes(context.base)
    vectors = [load_safetensors_bytes(tv) for tv in context.task_vectors]
    merged = merge_state_dicts(
        base, vectors, weights, method=cfg.search.method, density=cfg.search.density, seed=cfg.seed
    )
    model = load_unet_from_state(context.class_name, context.unet_config, merged)
    ev = cfg.evaluate
    images, done, fid = [], 0, math.nan
    for count in context.rungs:
        images.append(sample_images(
            model, context.scheduler_config, count - done, steps=ev.sampling_steps, eta=ev.eta,
            sampler=ev.sampler, seed=cfg.seed, batch_size=ev.batch_size, first_index=done,
        ))
        done = count
        fid = fid_score(torch.cat(images), context.reference, ev.feature, ev.inception_weights)
        if report is not None:
            report(fid, count)
    return fid


def load_unet_from_state(class_name: str, unet_config: dict[str, Any], state: dict[str, torch.Tensor]):
    from .ray_train import MODEL_CLASSES

    model = MODEL_CLASSES[class_name].from_config(unet_config)
    model.load_state_dict(state)
    return model.eval()


def fid_trial(config: dict[str, float], context: TrialContext) -> None:
    """A Ray Tune function trainable: one set of merge weights."""
    torch.set_num_threads(1)
    weights = [config[name] for name in coefficient_names(len(context.task_vectors))]
    score_weights(context, weights, report=lambda fid, samples: tune.report({"fid": fid, "samples": samples}))


def search_plan(search: SearchSection, n: int, seed: int):
    """(param_space, search_alg, num_samples) for the configured algorithm; the first points are
    the uniform 1/N weights and the plain sum (all ones)."""
    names = coefficient_names(n)
    low, high = search.bounds
    first = [dict.fromkeys(names, 1.0 / n), dict.fromkeys(names, 1.0)]
    first = [p for p in first if all(low <= v <= high for v in p.values())]
    if search.algorithm == "grid":
        values = np.linspace(low, high, search.grid_points).tolist()
        points = first + [dict(zip(names, combo)) for combo in product(values, repeat=n)]
        space = {name: tune.uniform(low, high) for name in names}
        return space, BasicVariantGenerator(points_to_evaluate=points, max_concurrent=0), len(points)
    space = {name: tune.uniform(low, high) for name in names}
    if search.algorithm == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        algorithm = OptunaSearch(
            sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
            points_to_evaluate=first,
        )
        return space, algorithm, search.trials
    return space, BasicVariantGenerator(points_to_evaluate=first, random_state=seed), search.trials


def trial_context(run: TrainedRun, cfg: ExperimentConfig, reference: ReferenceStats) -> TrialContext:
    base = load_file(run.base_dir / WEIGHTS_NAME)
    vectors = task_vectors(base, [load_file(folder / WEIGHTS_NAME) for folder in run.expert_dirs])
    unet = load_unet(run.base_dir)
    scheduler_config = json.loads((run.base_dir / "scheduler_config.json").read_text())
    return TrialContext(
        class_name=type(unet).__name__,
        unet_config=dict(unet.config),
        scheduler_config=scheduler_config,
        base=save_safetensors_bytes({k: v.contiguous() for k, v in base.items()}),
        task_vectors=[save_safetensors_bytes(v) for v in vectors],
        reference=reference,
        cfg=cfg.model_dump(),
        rungs=fid_rungs(cfg.search.fid_samples, cfg.search.early_stopping),
    )


def run_search(
    run_dir: str | Path,
    cfg: ExperimentConfig | None = None,
    *,
    address: str | None = None,
    include_dashboard: bool = True,
) -> dict[str, Any]:
    """Search the merge weights of a finished `deme-ray train` run; writes OUT/search/ and OUT/merged/."""
    run = load_run(Path(run_dir))
    cfg = cfg or run.config
    reference = reference_stats(
        cfg.data.train, run.resolution, run.channels, cfg.data.held_out, cfg.evaluate.feature,
        cfg.evaluate.inception_weights,
    )
    context = trial_context(run, cfg, reference)
    n = len(run.expert_dirs)
    space, algorithm, num_samples = search_plan(cfg.search, n, cfg.seed)
    rungs = context.rungs
    scheduler = (
        ASHAScheduler(time_attr="training_iteration", max_t=len(rungs), grace_period=1, reduction_factor=2)
        if len(rungs) > 1 else FIFOScheduler()
    )
    out = run.out_dir / SEARCH_DIR
    out.mkdir(parents=True, exist_ok=True)
    with ray_session(address, include_dashboard=include_dashboard):
        import ray

        concurrent = cfg.search.max_concurrent or max(1, int(ray.cluster_resources().get("CPU", 1)))
        tuner = tune.Tuner(
            tune.with_parameters(fid_trial, context=context),
            param_space=space,
            tune_config=tune.TuneConfig(
                metric="fid", mode="min", search_alg=algorithm, scheduler=scheduler,
                num_samples=num_samples, max_concurrent_trials=concurrent,
            ),
            run_config=tune.RunConfig(name="merge-weights", storage_path=str(out / "tune"), verbose=0),
        )
        results = tuner.fit()
    names = coefficient_names(n)
    frame = results.get_dataframe()
    columns = ["trial_id", "fid", "samples", "training_iteration"] + [f"config/{w}" for w in names]
    table = frame[[c for c in columns if c in frame.columns]].rename(columns={f"config/{w}": w for w in names})
    table = table.sort_values("trial_id").reset_index(drop=True)  # creation order
    table.to_csv(out / "trials.csv", index=False)
    full = table[table["samples"] == rungs[-1]]
    if full.empty:
        raise DemeError("no search trial finished all its samples: raise search.trials or search.fid_samples")
    best_row = full.loc[full["fid"].idxmin()]
    best_weights = [float(best_row[w]) for w in names]
    best = {
        "weights": best_weights,
        "method": cfg.search.method,
        "fid": float(best_row["fid"]),
        "fid_samples": rungs[-1],
        "trials": len(table),
        "fid_evaluations": int(table["training_iteration"].sum()),
        "algorithm": cfg.search.algorithm,
    }
    write_json_atomic(out / "best.json", best)
    plot_search(table, names, out / "search.png")
    merge_folders(
        run.base_dir, run.expert_dirs, best_weights, run.out_dir / MERGED_DIR,
        method=cfg.search.method, density=cfg.search.density, seed=cfg.seed, fid=best["fid"],
    )
    return best


def plot_search(table, names: list[str], path: Path) -> None:
    """FID by trial, and FID against each coefficient (trials at the full sample count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    full = table[table["samples"] == table["samples"].max()]
    fig, axes = plt.subplots(1, 1 + len(names), figsize=(3.2 * (1 + len(names)), 3), squeeze=False)
    axes[0][0].plot(range(len(table)), table["fid"], "o", ms=3, color="grey", label="last reported")
    axes[0][0].plot(full.index, full["fid"], "o", ms=4, color="C0", label="full samples")
    axes[0][0].set(xlabel="trial", ylabel="FID", title="FID by trial")
    axes[0][0].legend(fontsize=7)
    for ax, name in zip(axes[0][1:], names):
        ax.plot(full[name], full["fid"], "o", ms=4)
        ax.set(xlabel=name, title=f"FID vs {name}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
