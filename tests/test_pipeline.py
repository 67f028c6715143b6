"""Train -> tune -> merge -> evaluate on a user's own RGB pipeline folder (slow: Ray Train + Tune)."""

import json

import pytest
from diffusers import DDPMPipeline, DDPMScheduler
from PIL import Image

from deme_ray import ProjectedUNet2DModel, load_unet
from deme_ray.config import load_config
from deme_ray.evaluate import evaluate_run
from deme_ray.ray_train import train_experts
from deme_ray.search import run_search

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained_run(ray_local, tmp_path_factory, user_pipeline, user_images):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    cfg = load_config(None, [
        f"model.base={user_pipeline}", f"data.train={user_images}", "data.held_out=0.25",
        "decouple.num_ranges=2", "decouple.steps=4", "decouple.checkpoint_every=4", "decouple.batch_size=8",
        "decouple.cpus_per_worker=0.5", "decouple.learning_rate=1e-3",
        "search.trials=4", "search.fid_samples=32", "search.max_concurrent=2",
        "evaluate.num_samples=16", "evaluate.sampling_steps=3", "evaluate.batch_size=16",
    ])
    train_experts(cfg, out)
    return out, cfg


def test_tune_writes_results_and_the_best_merge(trained_run):
    out, cfg = trained_run
    best = run_search(out, cfg)
    trials = (out / "search" / "trials.csv").read_text().splitlines()
    assert trials[0].startswith("trial_id,fid,samples") and len(trials) == 1 + 4
    on_disk = json.loads((out / "search" / "best.json").read_text())
    assert on_disk == best and len(best["weights"]) == 2 and best["fid"] > 0
    assert best["fid_samples"] == 32
    with Image.open(out / "search" / "search.png") as plot:
        assert plot.size[0] > 300 and plot.getextrema() != ((255, 255),) * len(plot.getbands())
    merged = load_unet(out / "merged")
    assert isinstance(merged, ProjectedUNet2DModel)
    card = (out / "merged" / "README.md").read_text()
    assert "Weights: " + ",".join(repr(w) for w in best["weights"]) in card or str(best["weights"][0])[:5] in card
    pipe = DDPMPipeline(unet=merged, scheduler=DDPMScheduler.from_pretrained(out / "merged"))
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)


def test_first_trials_are_uniform_and_plain_sum(trained_run):
    out, cfg = trained_run
    if not (out / "search" / "trials.csv").exists():
        run_search(out, cfg)
    import pandas as pd

    trials = pd.read_csv(out / "search" / "trials.csv")
    points = {tuple(round(v, 6) for v in row) for row in trials[["w0", "w1"]].itertuples(index=False)}
    assert (0.5, 0.5) in points and (1.0, 1.0) in points


def test_evaluate_compares_base_ensemble_and_merged(trained_run):
    out, cfg = trained_run
    if not (out / "merged").exists():
        run_search(out, cfg)
    result = evaluate_run(out, cfg)
    names = [r["model"] for r in result["models"]]
    assert names == ["base", "ensemble", "merged"]
    assert all(r["fid"] > 0 and r["samples"] == 16 for r in result["models"])
    table = (out / "evaluation" / "results.md").read_text()
    assert "| ensemble |" in table and "| merged |" in table
    for name in names:
        with Image.open(out / "evaluation" / f"{name}.png") as grid:
            assert grid.size[0] >= 8


def test_demo_cli_writes_a_report_with_three_fids(ray_local, tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    result = CliRunner().invoke(app, [
        "demo", "--quick", "--out", str(tmp_path / "demo"),
        "--set", "decouple.steps=4", "--set", "search.trials=3", "--set", "search.fid_samples=32",
        "--set", "evaluate.num_samples=32", "--set", "evaluate.sampling_steps=5",
    ])
    assert result.exit_code == 0, result.output
    report = (tmp_path / "demo" / "report.md").read_text()
    for model in ("base", "ensemble", "merged"):
        assert f"| {model} |" in report
    assert "Best merge weights" in report and "evaluation/merged.png" in report
    assert str(tmp_path / "demo" / "report.md") in result.output.replace("\n", "")
