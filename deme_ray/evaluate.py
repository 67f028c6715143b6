"""Evaluation on equal terms: base, timestep-routed ensemble and merged model(s), same sampler, same
noise seeds, FID against the same held-out reference statistics; a markdown + JSON table and grids."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig
from .fid import fid_score, reference_stats
from .model import load_unet
from .run_record import TrainedRun, load_run, write_json_atomic
from .sampling import EnsembleUNet, sample_images, save_grid

EVALUATION_DIR = "evaluation"
GRID_IMAGES = 64


def run_models(run: TrainedRun) -> dict[str, torch.nn.Module]:
    """The models a run offers: base, ensemble, and every merged folder (merged*/) it holds."""
    models = {"base": load_unet(run.base_dir)}
    models["ensemble"] = EnsembleUNet([(r, load_unet(d)) for r, d in zip(run.ranges, run.expert_dirs)])
    for folder in sorted(run.out_dir.glob("merged*")):
        if (folder / "config.json").is_file():
            models[folder.name] = load_unet(folder)
    return models


def evaluate_run(run_dir: str | Path, cfg: ExperimentConfig | None = None) -> dict[str, Any]:
    """FID of every model of the run; writes OUT/evaluation/{results.md,results.json,<model>.png}."""
    run = load_run(Path(run_dir))
    cfg = cfg or run.config
    ev = cfg.evaluate
    reference = reference_stats(
        cfg.data.train, run.resolution, run.channels, cfg.data.held_out, ev.feature, ev.inception_weights
    )
    scheduler_config = json.loads((run.base_dir / "scheduler_config.json").read_text())
    out = run.out_dir / EVALUATION_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, model in run_models(run).items():
        started = time.time()
        images = sample_images(
            model, scheduler_config, ev.num_samples, steps=ev.sampling_steps, eta=ev.eta, sampler=ev.sampler,
            seed=cfg.seed, batch_size=ev.batch_size,
        )
        fid = fid_score(images, reference, ev.feature, ev.inception_weights)
        save_grid(images[:GRID_IMAGES], out / f"{name}.png")
        rows.append({"model": name, "fid": fid, "samples": ev.num_samples, "seconds": round(time.time() - started, 1)})
    result = {
        "run": str(run.out_dir),
        "feature": ev.feature,
        "sampler": f"{ev.sampler} {ev.sampling_steps} steps, eta {ev.eta}",
        "seed": cfg.seed,
        "models": rows,
    }
    write_json_atomic(out / "results.json", result)
    tmp = out / ".results.md.tmp"
    tmp.write_text(results_markdown(result))
    tmp.replace(out / "results.md")
    return result


def results_markdown(result: dict[str, Any]) -> str:
    lines = [
        f"FID ({result['feature']} features, {result['sampler']}, seed {result['seed']}, "
        "same noise for every model; lower is better)",
        "",
        "| model | FID | samples | seconds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['model']} | {r['fid']:.3f} | {r['samples']} | {r['seconds']} |" for r in result["models"]]
    return "\n".join(lines) + "\n"
