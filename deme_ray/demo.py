"""`deme-ray demo`: the whole DeMe pipeline on the embedded default, in one local Ray session.

train 4 experts -> search merge weights with Ray Tune -> merge -> evaluate base vs ensemble vs
merged -> OUT/report.md with the FID table, the best weights, sample grids and the search plot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .cluster import ray_session
from .config import ExperimentConfig, load_config
from .evaluate import EVALUATION_DIR, evaluate_run, results_markdown
from .ray_train import train_experts
from .search import SEARCH_DIR, run_search

# Settings sized for two CPU cores: default <= 15 minutes, --quick <= 3 minutes.
DEMO_SETTINGS = {
    "default": [
        "decouple.steps=300", "decouple.batch_size=64", "decouple.learning_rate=1e-4",
        "decouple.checkpoint_every=100", "decouple.cpus_per_worker=0.5",
        "search.trials=16", "search.fid_samples=512",
        "evaluate.num_samples=1000", "evaluate.sampling_steps=50",
    ],
    "quick": [
        "decouple.steps=40", "decouple.batch_size=32", "decouple.learning_rate=1e-4",
        "decouple.checkpoint_every=40", "decouple.cpus_per_worker=0.5",
        "search.trials=6", "search.fid_samples=128",
        "evaluate.num_samples=256", "evaluate.sampling_steps=20",
    ],
}


def demo_config(quick: bool, overrides: list[str] | None = None) -> ExperimentConfig:
    return load_config(None, DEMO_SETTINGS["quick" if quick else "default"] + list(overrides or []))


def run_demo(
    out: str | Path,
    *,
    quick: bool = False,
    overwrite: bool = False,
    overrides: list[str] | None = None,
    include_dashboard: bool = True,
    say: Callable[[str], None] = print,
) -> Path:
    out = Path(out).resolve()
    cfg = demo_config(quick, overrides)
    with ray_session(None, include_dashboard=include_dashboard):
        say(f"1/3 training {cfg.decouple.num_ranges or 4} experts ({cfg.decouple.steps} steps each) into {out}")
        train_experts(cfg, out, overwrite=overwrite)
        say(f"2/3 searching merge weights ({cfg.search.algorithm}, {cfg.search.trials} trials)")
        best = run_search(out, cfg)
    say(f"3/3 evaluating base, ensemble and merged ({cfg.evaluate.num_samples} samples each)")
    result = evaluate_run(out, cfg)
    report = out / "report.md"
    tmp = out / ".report.md.tmp"
    tmp.write_text(report_markdown(cfg, best, result))
    tmp.replace(report)
    return report


def report_markdown(cfg: ExperimentConfig, best: dict, result: dict) -> str:
    weights = ", ".join(f"{w:.3f}" for w in best["weights"])
    grids = "\n".join(f"![{r['model']}]({EVALUATION_DIR}/{r['model']}.png)" for r in result["models"])
    return f"""# deme-ray demo report

Embedded default (bundled digits DDPM), {cfg.decouple.num_ranges or 4} experts x {cfg.decouple.steps} steps,
merge weights searched with {best['algorithm']} over {best['trials']} trials ({best['fid_evaluations']} FID evaluations).

## FID

{results_markdown(result)}
## Best merge weights (low-t to high-t experts)

`{weights}` ({best['method']}; FID {best['fid']:.3f} on {best['fid_samples']} search samples)

## Samples

{grids}

## Search

![search]({SEARCH_DIR}/search.png)
"""
