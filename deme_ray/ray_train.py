"""The Ray layer of the decouple stage: one Ray Train ``TorchTrainer`` per timestep range, all at once.

Each trainer's ``fit()`` runs in a driver thread (Ray 2.60 Train V2 starts a run only when all of
its workers can be placed, so concurrent fits share the cluster without deadlock). Workers read
the base weights from the object store (safetensors bytes, put once), train with the pure-PyTorch
``ExpertTrainer``, and checkpoint through ``ray.train.report`` into the run's storage path; the
final checkpoint carries the expert's diffusers folder, which the driver copies to
``OUT/experts/<lo>_<hi>/``. Re-running with the same run names resumes from the last checkpoints.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import torch
from diffusers import DDPMScheduler
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .cluster import check_resources, ray_session
from .config import ExperimentConfig
from .data import load_images
from .errors import DemeError
from .model import (
    BaseModel,
    ProjectedUNet2DModel,
    UNet2DModel,
    atomic_directory,
    copy_model,
    publish,
    save_model_folder,
)
from .objective import TimestepRange, TimestepSampler, range_name
from .plan import ExperimentPlan, plan_experiment
from .run_record import RUN_FILE, read_run, verify_hashes, weight_hashes, write_json_atomic
from .training import ExpertTrainer, StepSettings

log = logging.getLogger(__name__)

EXPERT_DIR = "expert"
MODEL_CLASSES = {cls.__name__: cls for cls in (UNet2DModel, ProjectedUNet2DModel)}


def worker_seed(seed: int, expert_index: int, rank: int) -> int:
    """Independent, reproducible random streams per (run seed, expert, DDP rank)."""
    return int(np.random.SeedSequence([seed, expert_index, rank]).generate_state(1)[0])


def model_payload(base: BaseModel) -> dict[str, Any]:
    """What workers need to rebuild the base: class, config, weights as safetensors bytes."""
    return {
        "class_name": type(base.unet).__name__,
        "unet_config": dict(base.unet.config),
        "scheduler_config": dict(base.scheduler.config),
        "weights": save_safetensors_bytes({k: v.contiguous() for k, v in base.unet.state_dict().items()}),
    }


def model_from_payload(payload: dict[str, Any]) -> tuple[UNet2DModel, DDPMScheduler]:
    unet = MODEL_CLASSES[payload["class_name"]].from_config(payload["unet_config"])
    unet.load_state_dict(load_safetensors_bytes(payload["weights"]))
    return unet, DDPMScheduler.from_config(payload["scheduler_config"])


def expert_train_loop(config: dict[str, Any]) -> None:
    """Runs in every Ray Train worker of one expert."""
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    cfg = ExperimentConfig.model_validate(config["experiment"])
    d = cfg.decouple
    torch.set_num_threads(max(1, int(d.cpus_per_worker)))
    device = ray.train.torch.get_device() if d.use_gpu else torch.device("cpu")
    lo, hi = config["range"]
    unet, scheduler = model_from_payload(ray.get(config["base_ref"]))
    teacher = copy_model(unet) if d.consistency_weight > 0 else None
    images = load_images(cfg.data.train, config["resolution"], unet.config.in_channels, cfg.data.held_out, "train")
    trainer = ExpertTrainer(
        unet,
        teacher,
        scheduler,
        images,
        TimestepSampler(lo, hi, scheduler.config.num_train_timesteps, d.p_global),
        StepSettings(d.learning_rate, d.batch_size, d.consistency_weight, d.ema_decay, d.mixed_precision),
        seed=worker_seed(cfg.seed, config["index"], rank),
        device=device,
        wrap=ray.train.torch.prepare_model if world_size > 1 else (lambda m: m),
    )
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.load_checkpoint(Path(folder), rank)
    resumed_from = trainer.step
    started_at = time.time()
    progress_every = max(1, d.steps // 10)
    while trainer.step < d.steps:
        metrics = trainer.train_step()
        metrics.update(started_at=started_at, resumed_from=resumed_from, pid=os.getpid(), rank=rank)
        done = trainer.step == d.steps
        if rank == 0 and (trainer.step % progress_every == 0 or done):
            print(f"[expert {range_name((lo, hi))}] step {trainer.step}/{d.steps} loss {metrics['loss']:.4f}", flush=True)
        if trainer.step % d.checkpoint_every == 0 or done:
            with tempfile.TemporaryDirectory() as tmp:
                trainer.save_checkpoint(Path(tmp), rank)
                if done and rank == 0:
                    save_model_folder(trainer.ema_model(), scheduler, Path(tmp) / EXPERT_DIR)
                    metrics["finished_at"] = time.time()
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))
        else:
            ray.train.report(metrics)


@dataclass
class ExpertOutcome:
    name: str
    metrics: dict[str, Any] | None
    error: str | None


def prepare_output(out: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (out / RUN_FILE).is_file():
            raise DemeError(f"--resume: {out} holds no {RUN_FILE}; start a new run without --resume")
        return
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise DemeError(
                f"output folder {out} exists and is not empty: pass --resume to continue that run, "
                "--overwrite to replace it, or choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def _export_expert(result: Any, out: Path, name: str) -> None:
    final = out / "experts" / name
    tmp = atomic_directory(final)
    try:
        with result.checkpoint.as_directory() as folder:
            shutil.copytree(Path(folder) / EXPERT_DIR, tmp, dirs_exist_ok=True)
        publish(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def train_experts(
    cfg: ExperimentConfig,
    out_dir: str | Path | None = None,
    *,
    address: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    include_dashboard: bool = True,
    max_concurrent: int | None = None,
) -> dict[str, Any]:
    """Finetune one expert per timestep range concurrently; returns the run record (run.json).

    ``max_concurrent`` caps how many experts' ``fit()`` run at once (None: all of them)."""
    out = Path(out_dir or cfg.output_dir).expanduser().resolve()
    if resume:
        prepare_output(out, resume=True, overwrite=False)
        record = read_run(out)
        cfg = ExperimentConfig.model_validate(record["config"])
    plan = plan_experiment(cfg)
    base, ranges, resolution = plan.base, plan.ranges, plan.resolution
    if not resume:
        prepare_output(out, resume=False, overwrite=overwrite)
        save_model_folder(base.unet, base.scheduler, out / "base")
        record = new_record(plan, out)
        write_json_atomic(out / RUN_FILE, record)
    else:
        verify_hashes(out, {k: v for k, v in record["sha256"].items() if k.startswith("base/")})

    pending = [(i, r) for i, r in enumerate(ranges) if record["experts"][range_name(r)]["status"] != "finished"]
    for i, r in enumerate(ranges):
        if (i, r) not in pending:
            done = record["experts"][range_name(r)]
            verify_hashes(out, {k: v for k, v in record["sha256"].items() if k.startswith(done["path"] + "/")})
    storage = cfg.decouple.storage_path or str(out / "checkpoints")
    with ray_session(address, include_dashboard=include_dashboard):
        check_resources(cfg.decouple.workers_per_expert, cfg.decouple.cpus_per_worker, cfg.decouple.use_gpu)
        base_ref = ray.put(model_payload(base))
        trainers = {}
        for index, r in pending:
            trainers[range_name(r)] = build_trainer(cfg, record["run_id"], index, r, resolution, base_ref, storage)
        record["status"] = "running"
        write_json_atomic(out / RUN_FILE, record)
        with ThreadPoolExecutor(max_workers=max(1, min(len(trainers), max_concurrent or len(trainers)))) as pool:
            futures = {pool.submit(t.fit): name for name, t in trainers.items()}
            outcomes = []
            for future in as_completed(futures):
                name = futures[future]
                outcome = _collect(future, out, name)
                outcomes.append(outcome)
                _record_outcome(record, out, outcome)
                write_json_atomic(out / RUN_FILE, record)
    failed = [o for o in outcomes if o.error]
    record["status"] = "failed" if failed else "finished"
    write_json_atomic(out / RUN_FILE, record)
    if failed:
        names = ", ".join(f"{o.name} ({o.error})" for o in failed)
        raise DemeError(f"{len(failed)} expert(s) failed: {names}; fix the cause and run `deme-ray train --resume {out}`")
    return record


def build_trainer(cfg, run_id, index, r: TimestepRange, resolution, base_ref, storage) -> TorchTrainer:
    d = cfg.decouple
    resources = {"CPU": d.cpus_per_worker}
    if d.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        expert_train_loop,
        train_loop_config={
            "experiment": cfg.model_dump(),
            "index": index,
            "range": list(r),
            "resolution": resolution,
            "base_ref": base_ref,
        },
        scaling_config=ScalingConfig(
            num_workers=d.workers_per_expert, use_gpu=d.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=f"deme-{run_id}-{range_name(r)}",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=d.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )


def _collect(future, out: Path, name: str) -> ExpertOutcome:
    try:
        result = future.result()
    except Exception as exc:  # a failed fit() must not lose the other experts' results
        return ExpertOutcome(name, None, str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)
    if result.error is not None or result.checkpoint is None:
        return ExpertOutcome(name, result.metrics, str(result.error or "no checkpoint was reported"))
    _export_expert(result, out, name)
    return ExpertOutcome(name, result.metrics, None)


def _record_outcome(record: dict[str, Any], out: Path, outcome: ExpertOutcome) -> None:
    entry = record["experts"][outcome.name]
    if outcome.error:
        entry.update(status="failed", error=outcome.error)
        return
    m = outcome.metrics
    entry.update(
        status="finished",
        steps_done=m["step"],
        metrics={k: m[k] for k in ("loss", "denoise_loss", "consistency_loss") if k in m},
        started_at=m["started_at"],
        finished_at=m["finished_at"],
        train_seconds=m["time"] - m["started_at"],
    )
    entry.pop("error", None)
    record["sha256"].update(weight_hashes(out / entry["path"], out))


def new_record(plan: ExperimentPlan, out: Path) -> dict[str, Any]:
    cfg = plan.config
    return {
        "run_id": time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3),
        "status": "created",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.seed,
        "config": cfg.model_dump(),
        "num_train_timesteps": plan.num_train_timesteps,
        "resolution": plan.resolution,
        "num_train_images": plan.num_train_images,
        "ranges": [list(r) for r in plan.ranges],
        "base": {"path": "base", "source": cfg.model.base},
        "experts": {
            range_name(r): {"range": list(r), "path": f"experts/{range_name(r)}", "status": "pending"}
            for r in plan.ranges
        },
        "sha256": weight_hashes(out / "base", out),
    }
