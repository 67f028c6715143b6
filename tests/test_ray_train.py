"""The decouple stage end to end on a private local Ray (slow: each test starts Ray Train runs)."""

import json
import time

import pytest
import torch
from diffusers import UNet2DModel

from deme_ray import ProjectedUNet2DModel, load_unet
from deme_ray.config import load_config
from deme_ray.errors import DemeError
from deme_ray.ray_train import train_experts
from deme_ray.run_record import sha256

pytestmark = pytest.mark.slow

TINY = ["decouple.steps=4", "decouple.checkpoint_every=2", "decouple.batch_size=8", "decouple.cpus_per_worker=0.5"]


def state(folder):
    return load_unet(folder).state_dict()


def test_two_experts_train_concurrently_and_differ_from_base(ray_local, tmp_path):
    cfg = load_config(None, TINY + ["decouple.num_ranges=2", "decouple.learning_rate=1e-3"])
    record = train_experts(cfg, tmp_path / "run")
    out = tmp_path / "run"
    assert record["status"] == "finished"
    base = state(out / "base")
    assert isinstance(load_unet(out / "base"), ProjectedUNet2DModel)
    for name in ("0_500", "500_1000"):
        entry = record["experts"][name]
        assert entry["status"] == "finished" and entry["steps_done"] == 4
        expert = state(out / "experts" / name)
        assert expert.keys() == base.keys()
        assert any(not torch.equal(expert[k], base[k]) for k in base)
        assert any(not torch.equal(expert[k], base[k]) for k in base if k.endswith("channel_projection.weight"))
    on_disk = json.loads((out / "run.json").read_text())
    assert on_disk["ranges"] == [[0, 500], [500, 1000]] and on_disk["seed"] == 0
    assert len(on_disk["sha256"]) == 3
    for rel, digest in on_disk["sha256"].items():
        assert sha256(out / rel) == digest
    spans = [(e["started_at"], e["finished_at"]) for e in on_disk["experts"].values()]
    assert max(s for s, _ in spans) < min(f for _, f in spans), f"experts ran one after the other: {spans}"

    # --resume on a finished run trains nothing and leaves the experts untouched
    again = train_experts(cfg, out, resume=True)
    assert again["sha256"] == on_disk["sha256"]


def test_user_pipeline_and_rgb_folder_at_another_resolution(ray_local, tmp_path, user_pipeline, user_images):
    cfg = load_config(None, TINY + [
        f"model.base={user_pipeline}", f"data.train={user_images}", "data.resolution=16",
        "decouple.boundaries=[0, 30, 100]", "decouple.channel_projection=false", "decouple.learning_rate=1e-3",
    ])
    record = train_experts(cfg, tmp_path / "run")
    assert record["resolution"] == 16 and record["num_train_timesteps"] == 100
    for name in ("0_30", "30_100"):
        expert = UNet2DModel.from_pretrained(tmp_path / "run" / "experts" / name)  # stock diffusers
        assert type(expert) is UNet2DModel and expert.config.in_channels == 3
        with torch.no_grad():
            assert expert(torch.randn(2, 3, 16, 16), torch.tensor([5, 50])).sample.shape == (2, 3, 16, 16)


def test_use_gpu_without_gpus_fails_fast(ray_local, tmp_path):
    cfg = load_config(None, TINY + ["decouple.use_gpu=true"])
    started = time.time()
    with pytest.raises(DemeError, match="use_gpu is set but the Ray cluster has 0 GPU"):
        train_experts(cfg, tmp_path / "run")
    assert time.time() - started < 30


def test_more_workers_than_the_cluster_holds_fails_fast(ray_local, tmp_path):
    cfg = load_config(None, TINY + ["decouple.workers_per_expert=8"])
    with pytest.raises(DemeError, match="can hold at most 4 such worker"):
        train_experts(cfg, tmp_path / "run")


def test_non_empty_output_folder_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep.txt").write_text("mine")
    with pytest.raises(DemeError, match="--resume .* --overwrite"):
        train_experts(load_config(None, TINY), tmp_path / "run")
    assert (tmp_path / "run" / "keep.txt").read_text() == "mine"


def test_ddp_across_two_workers_of_one_expert(ray_local, tmp_path):
    cfg = load_config(None, TINY + ["decouple.num_ranges=1", "decouple.workers_per_expert=2"])
    record = train_experts(cfg, tmp_path / "run")
    entry = record["experts"]["0_1000"]
    assert entry["status"] == "finished" and entry["steps_done"] == 4
    assert (tmp_path / "run" / "experts" / "0_1000" / "diffusion_pytorch_model.safetensors").is_file()
