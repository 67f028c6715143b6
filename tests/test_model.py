import json

import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from deme_ray import load_unet
from deme_ray.errors import DemeError
from deme_ray.model import (
    ProjectedUNet2DModel,
    load_base,
    projection_widths,
    save_model_folder,
    with_identity_projections,
)
from deme_ray.pretrain import digits_unet

from .conftest import tiny_unet


def test_projection_widths_come_from_the_config():
    widths = projection_widths(digits_unet().config)
    assert widths == {
        "down_blocks.0": 16, "down_blocks.1": 32, "down_blocks.2": 64, "mid_block": 64,
        "up_blocks.0": 64, "up_blocks.1": 32, "up_blocks.2": 16,
    }
    assert projection_widths(tiny_unet().config)["up_blocks.1"] == 8


def test_projections_at_init_leave_the_output_unchanged():
    torch.manual_seed(0)
    plain = digits_unet()
    projected = with_identity_projections(plain)
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([0, 400, 999])
    with torch.no_grad():
        assert torch.equal(plain(x, t).sample, projected(x, t).sample)
        projected.mid_block.channel_projection.weight.mul_(1.5)
        assert not torch.allclose(plain(x, t).sample, projected(x, t).sample)


def test_projections_add_about_one_percent_parameters():
    plain = digits_unet()
    extra = sum(p.numel() for p in with_identity_projections(plain).parameters()) - sum(
        p.numel() for p in plain.parameters())
    assert extra == sum(c * c for c in projection_widths(plain.config).values())
    assert extra / sum(p.numel() for p in plain.parameters()) < 0.05


def test_projected_folder_round_trips_and_runs_in_a_stock_pipeline(tmp_path):
    model = with_identity_projections(tiny_unet())
    with torch.no_grad():
        model.up_blocks[0].channel_projection.weight.mul_(0.5)
    save_model_folder(model, DDPMScheduler(num_train_timesteps=50), tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["_class_name"] == "ProjectedUNet2DModel"
    loaded = load_unet(tmp_path / "m")
    assert isinstance(loaded, ProjectedUNet2DModel)
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    pipe = DDPMPipeline(unet=loaded, scheduler=DDPMScheduler.from_pretrained(tmp_path / "m"))
    images = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (2, 8, 8, 3)


def test_plain_folder_loads_with_stock_diffusers(tmp_path):
    save_model_folder(tiny_unet(), DDPMScheduler(), tmp_path / "plain")
    assert type(UNet2DModel.from_pretrained(tmp_path / "plain")) is UNet2DModel
    assert type(load_unet(tmp_path / "plain")) is UNet2DModel


def test_base_from_pipeline_folder_uses_its_scheduler(user_pipeline):
    base = load_base(str(user_pipeline), channel_projection=True)
    assert isinstance(base.unet, ProjectedUNet2DModel)
    assert base.num_train_timesteps == 100 and base.scheduler.config.prediction_type == "v_prediction"


def test_bundled_base_is_a_loadable_pipeline():
    base = load_base("bundled:digits", channel_projection=False)
    assert type(base.unet) is UNet2DModel and base.unet.config.sample_size == 16
    assert base.num_train_timesteps == 1000


@pytest.mark.parametrize("spec, message", [("/no/such/folder", "does not exist"), ("bundled:cifar", "unknown bundled")])
def test_bad_model_base_rejected(spec, message):
    with pytest.raises(DemeError, match=message):
        load_base(spec, channel_projection=True)


def test_folder_without_config_rejected(tmp_path):
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(DemeError, match="neither model_index.json"):
        load_base(str(tmp_path), channel_projection=True)
