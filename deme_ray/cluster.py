"""Connecting to Ray (embedded local instance or an existing cluster) and checking that a request can be met.

A Train run whose workers can never be placed (``use_gpu`` without GPUs, more CPUs than any node
has) waits forever without an error in Ray 2.60, so requests are checked before launch.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Iterator

import ray

from .errors import DemeError

log = logging.getLogger(__name__)

DASHBOARD_HOST = "127.0.0.1"


@contextlib.contextmanager
def ray_session(address: str | None = None, include_dashboard: bool = True) -> Iterator[None]:
    """Use the Ray already initialised in this process, join ``address``, or start a local Ray
    (dashboard on 127.0.0.1, Train run-state tracking on); shut down only what this call started."""
    if ray.is_initialized():
        yield
        return
    if include_dashboard:  # the Train view of the dashboard reads this state; without a dashboard it only errs
        os.environ.setdefault("RAY_TRAIN_ENABLE_STATE_TRACKING", "1")
    try:
        if address:
            context = ray.init(address=address)
        else:
            context = ray.init(include_dashboard=include_dashboard, dashboard_host=DASHBOARD_HOST)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        target = address or "a local Ray instance"
        raise DemeError(f"cannot connect to {target}: {str(exc).splitlines()[0]}") from None
    try:
        if context.dashboard_url:
            log.info("Ray dashboard: http://%s", context.dashboard_url)
        yield
    finally:
        ray.shutdown()


def check_resources(workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Fail fast when no node set of the current cluster can ever hold one expert's workers."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = [n["Resources"].get("CPU", 0.0) for n in nodes]
    node_gpus = [n["Resources"].get("GPU", 0.0) for n in nodes]
    if use_gpu and sum(node_gpus) < workers:
        raise DemeError(
            f"decouple.use_gpu is set but the Ray cluster has {sum(node_gpus):g} GPU(s) for {workers} worker(s) "
            "per expert: set decouple.use_gpu=false or add GPU nodes"
        )
    if not any(c >= cpus_per_worker for c in node_cpus):
        raise DemeError(
            f"decouple.cpus_per_worker={cpus_per_worker:g} but the largest node has {max(node_cpus, default=0):g} "
            "CPUs: lower decouple.cpus_per_worker"
        )
    slots = sum(int(c // cpus_per_worker) for c in node_cpus)
    if use_gpu:
        slots = min(slots, int(sum(node_gpus)))
    if workers > slots:
        raise DemeError(
            f"decouple.workers_per_expert={workers} but the Ray cluster can hold at most {slots} such worker(s) "
            f"at once ({sum(node_cpus):g} CPUs): lower workers_per_expert or cpus_per_worker, or add nodes"
        )
