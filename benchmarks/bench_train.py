"""Decouple-stage benchmark: concurrency of experts on Ray, and the cost of a DeMe step.

(1) wall time of 2 experts trained concurrently vs the same 2 one after the other (same Ray
    instance, same settings; only ``max_concurrent`` differs);
(2) time per DeMe step (teacher + projections) vs a plain finetuning step of the same model
    (no teacher, no projections), and vs the same DeMe step inside a Ray Train worker.

    python benchmarks/bench_train.py --steps 60 --repeats 2 --json benchmarks/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from deme_ray.config import load_config
from deme_ray.data import load_images
from deme_ray.model import copy_model, load_base
from deme_ray.objective import TimestepSampler
from deme_ray.ray_train import train_experts
from deme_ray.training import ExpertTrainer, StepSettings


def local_step_seconds(steps: int, batch_size: int, deme: bool, seed: int = 0) -> float:
    """Seconds per step of the pure-PyTorch loop on one thread (what one Ray worker gets)."""
    base = load_base("bundled:digits", channel_projection=deme)
    images = load_images("bundled:digits", 16, 1, 0.2, "train")
    trainer = ExpertTrainer(
        copy_model(base.unet),
        copy_model(base.unet) if deme else None,
        base.scheduler,
        images,
        TimestepSampler(0, 500, 1000, 0.3),
        StepSettings(5e-5, batch_size, 1.0 if deme else 0.0, 0.9999),
        seed=seed,
    )
    trainer.train_step()  # warm-up, as the Ray worker's first step is inside its timing too
    started = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    return (time.perf_counter() - started) / steps


def ray_run(steps: int, batch_size: int, max_concurrent: int | None) -> tuple[float, list[float]]:
    """(wall seconds of train_experts, seconds per step inside each expert's Ray worker)."""
    cfg = load_config(None, [
        "decouple.num_ranges=2", f"decouple.steps={steps}", f"decouple.batch_size={batch_size}",
        f"decouple.checkpoint_every={steps}", "decouple.cpus_per_worker=1",
    ])
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        record = train_experts(cfg, Path(tmp) / "run", max_concurrent=max_concurrent)
        wall = time.perf_counter() - started
    return wall, [e["train_seconds"] / e["steps_done"] for e in record["experts"].values()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    torch.set_num_threads(1)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    concurrent, sequential, ray_steps = [], [], []
    for _ in range(args.repeats):
        wall, per_step = ray_run(args.steps, args.batch_size, None)
        concurrent.append(wall)
        wall_seq, per_step_seq = ray_run(args.steps, args.batch_size, 1)
        sequential.append(wall_seq)
        ray_steps += per_step_seq  # one expert at a time: no contention for the cores
    ray.shutdown()
    deme_local = [local_step_seconds(args.steps, args.batch_size, deme=True) for _ in range(args.repeats)]
    plain_local = [local_step_seconds(args.steps, args.batch_size, deme=False) for _ in range(args.repeats)]

    med = statistics.median
    results = {
        "settings": vars(args) | {"json": str(args.json)},
        "concurrent_wall_s": concurrent,
        "sequential_wall_s": sequential,
        "concurrent_over_sequential": med(concurrent) / med(sequential),
        "deme_step_local_s": deme_local,
        "plain_step_local_s": plain_local,
        "deme_step_in_ray_s": ray_steps,
        "deme_over_plain_step": med(deme_local) / med(plain_local),
        "ray_over_local_step": med(ray_steps) / med(deme_local),
    }
    print(f"2 experts concurrent / sequential wall time: {results['concurrent_over_sequential']:.3f} "
          f"({med(concurrent):.1f}s / {med(sequential):.1f}s)")
    print(f"DeMe step / plain finetuning step: {results['deme_over_plain_step']:.3f} "
          f"({med(deme_local) * 1e3:.1f} ms / {med(plain_local) * 1e3:.1f} ms)")
    print(f"DeMe step in a Ray Train worker / outside Ray: {results['ray_over_local_step']:.3f} "
          f"({med(ray_steps) * 1e3:.1f} ms / {med(deme_local) * 1e3:.1f} ms)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
