"""Merge-weight search benchmarks on a trained run (e.g. the demo's): search efficiency and trial cost.

(2) FID evaluations Optuna (TPE) needs to come within the noise of the best grid point, as a ratio
    to the grid's evaluation count (grid: ``--grid-points`` values per coefficient, no early stopping
    on either side, same samples and seeds). The noise is the standard deviation of the best grid
    point's FID over ``--noise-seeds`` different noise seeds.
(3) Trial cost: samples/s of the in-memory trial path (merge in memory + batched sampling) vs a stock
    diffusers ``DDIMPipeline`` loading the same merge from disk, same model, steps and sample count.

    deme-ray demo --out runs/demo            # or any `deme-ray train` run
    python benchmarks/bench_search.py --run runs/demo --json benchmarks/bench_search.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
from diffusers import DDIMPipeline, DDIMScheduler

from deme_ray.cluster import ray_session
from deme_ray.config import apply_overrides, validate
from deme_ray.fid import fid_score, reference_stats
from deme_ray.merge import merge_folders
from deme_ray.run_record import load_run
from deme_ray.search import run_search, score_weights, trial_context


def search_curve(run_dir: Path, cfg, algorithm: str, trials: int, grid_points: int) -> pd.DataFrame:
    cfg = validate(apply_overrides(cfg.model_dump(), [
        f"search.algorithm={algorithm}", f"search.trials={trials}", f"search.grid_points={grid_points}",
        "search.early_stopping=false",
    ]))
    run_search(run_dir, cfg, include_dashboard=False)
    table = pd.read_csv(run_dir / "search" / "trials.csv")
    (run_dir / "search" / f"trials-{algorithm}.csv").write_text(table.to_csv(index=False))
    return table


def trial_cost(run_dir: Path, cfg, samples: int) -> dict[str, float]:
    """samples/s: in-memory trial path vs DDIMPipeline from a merged folder (merge time included in both)."""
    run = load_run(run_dir)
    ev = cfg.evaluate
    reference = reference_stats(cfg.data.train, run.resolution, run.channels, cfg.data.held_out, ev.feature)
    weights = [1.0 / len(run.expert_dirs)] * len(run.expert_dirs)
    cfg = validate(apply_overrides(cfg.model_dump(), ["search.early_stopping=false", f"search.fid_samples={samples}"]))
    context = trial_context(run, cfg, reference)
    started = time.perf_counter()
    score_weights(context, weights)
    trial_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        merge_folders(run.base_dir, run.expert_dirs, weights, Path(tmp) / "merged")
        from deme_ray import load_unet

        unet = load_unet(Path(tmp) / "merged")
        pipe = DDIMPipeline(unet=unet, scheduler=DDIMScheduler.from_pretrained(Path(tmp) / "merged"))
        pipe.set_progress_bar_config(disable=True)
        images = []
        for start in range(0, samples, ev.batch_size):
            count = min(ev.batch_size, samples - start)
            out = pipe(batch_size=count, num_inference_steps=ev.sampling_steps, eta=ev.eta, output_type="np",
                       generator=torch.Generator().manual_seed(start)).images
            images.append(torch.from_numpy(out).permute(0, 3, 1, 2) * 2 - 1)
        fid_score(torch.cat(images), reference, ev.feature)
        pipeline_s = time.perf_counter() - started
    return {"trial_samples_per_s": samples / trial_s, "pipeline_samples_per_s": samples / pipeline_s,
            "trial_over_pipeline": pipeline_s / trial_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--grid-points", type=int, default=3)
    parser.add_argument("--optuna-trials", type=int, default=24)
    parser.add_argument("--fid-samples", type=int, default=256)
    parser.add_argument("--noise-seeds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    run = load_run(args.run)
    cfg = validate(apply_overrides(run.record["config"], [f"search.fid_samples={args.fid_samples}"]))
    names = [f"w{i}" for i in range(len(run.expert_dirs))]

    with ray_session(None, include_dashboard=False):
        grid = search_curve(args.run, cfg, "grid", 1, args.grid_points)
        optuna = search_curve(args.run, cfg, "optuna", args.optuna_trials, args.grid_points)
    grid_best = grid.loc[grid["fid"].idxmin()]
    ev = cfg.evaluate
    reference = reference_stats(cfg.data.train, run.resolution, run.channels, cfg.data.held_out, ev.feature)
    context = trial_context(run, cfg, reference)
    noise = []
    for seed in range(1, args.noise_seeds + 1):
        context.cfg = validate(apply_overrides(cfg.model_dump(), [f"seed={seed}", "search.early_stopping=false"])).model_dump()
        context.rungs = [args.fid_samples]
        noise.append(score_weights(context, [float(grid_best[n]) for n in names]))
    sigma = statistics.stdev(noise)
    running = optuna["fid"].cummin()
    hits = running[running <= grid_best["fid"] + sigma]
    needed = int(hits.index[0]) + 1 if len(hits) else None
    cost = trial_cost(args.run, cfg, args.fid_samples)
    results = {
        "settings": {k: str(v) for k, v in vars(args).items()},
        "grid_evaluations": len(grid),
        "grid_best_fid": float(grid_best["fid"]),
        "grid_best_weights": [float(grid_best[n]) for n in names],
        "noise_fids_other_seeds": noise,
        "noise_sigma": sigma,
        "optuna_best_fid": float(optuna["fid"].min()),
        "optuna_evaluations_to_reach_grid": needed,
        "optuna_over_grid_evaluations": needed / len(grid) if needed else None,
        **cost,
    }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
