"""Sampling: ensemble routing, common random numbers (noise depends only on seed and image index),
agreement with diffusers' own pipelines, and PNG grids."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput
from PIL import Image
from torch import nn

from deme_ray.errors import DemeError
from deme_ray.model import copy_model
from deme_ray.sampling import EnsembleUNet, image_generators, sample_images, save_grid

from .conftest import tiny_unet

T = 100
SCHEDULER_CONFIG = dict(DDPMScheduler(num_train_timesteps=T).config)


class ConstantUNet(nn.Module):
    """Predicts ``value`` everywhere and records the timesteps it was asked about."""

    def __init__(self, value: float, sample_size: int = 4):
        super().__init__()
        self.value = nn.Parameter(torch.tensor(value))
        self.config = FrozenDict(sample_size=sample_size, in_channels=1, out_channels=1)
        self.seen: list[int] = []

    def forward(self, sample, timestep):
        self.seen += torch.as_tensor(timestep).reshape(-1).tolist()
        return UNet2DOutput(sample=torch.zeros_like(sample) + self.value)


def test_ensemble_sends_each_element_to_the_expert_of_its_timestep():
    low, high = ConstantUNet(1.0), ConstantUNet(2.0)
    ensemble = EnsembleUNet([((40, T), high), ((0, 40), low)])  # order given does not matter
    x = torch.zeros(5, 1, 4, 4)
    out = ensemble(x, torch.tensor([0, 39, 40, 99, 7])).sample
    assert out[:, 0, 0, 0].tolist() == [1.0, 1.0, 2.0, 2.0, 1.0]
    assert sorted(low.seen) == [0, 7, 39] and sorted(high.seen) == [40, 99]
    assert ensemble(x, 55).sample.unique().tolist() == [2.0]
    assert ensemble.config.sample_size == 4 and ensemble.num_train_timesteps == T
    with pytest.raises(DemeError, match=r"\[0, 100\)"):
        ensemble(x, T)


@pytest.mark.parametrize("ranges", [[(0, 40), (41, T)], [(0, 50), (40, T)], [(10, 50), (50, T)], [(0, 0), (0, T)]])
def test_ensemble_rejects_gaps_overlaps_and_a_late_start(ranges):
    with pytest.raises(DemeError, match="ensemble ranges"):
        EnsembleUNet([(r, ConstantUNet(0.0)) for r in ranges])


def test_ensemble_of_copies_of_one_unet_behaves_like_it():
    unet = tiny_unet(channels=1, attention=False).eval()
    ensemble = EnsembleUNet([((0, 30), copy_model(unet)), ((30, T), copy_model(unet))])
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([3, 60, 29, 30])
    with torch.no_grad():
        torch.testing.assert_close(ensemble(x, t).sample, unet(x, t).sample, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        sample_images(ensemble, SCHEDULER_CONFIG, 3, steps=3), sample_images(unet, SCHEDULER_CONFIG, 3, steps=3),
        atol=1e-5, rtol=1e-5,
    )


def test_ensemble_must_cover_the_schedulers_timesteps():
    ensemble = EnsembleUNet([((0, 50), ConstantUNet(0.0)), ((50, 500), ConstantUNet(0.0))])
    with pytest.raises(DemeError, match="500"):
        sample_images(ensemble, SCHEDULER_CONFIG, 2, steps=2)


@pytest.mark.parametrize("sampler,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddpm", 0.0)])
def test_noise_depends_only_on_seed_and_image_index(sampler, eta):
    """A constant predictor makes every step elementwise, so equal noise means bit-equal images."""
    model = ConstantUNet(0.1)
    run = dict(steps=4, sampler=sampler, eta=eta, seed=3)
    whole = sample_images(model, SCHEDULER_CONFIG, 7, batch_size=7, **run)
    assert torch.equal(whole, sample_images(model, SCHEDULER_CONFIG, 7, batch_size=3, **run))
    assert torch.equal(whole[4:], sample_images(model, SCHEDULER_CONFIG, 3, batch_size=2, first_index=4, **run))
    other_seed = sample_images(model, SCHEDULER_CONFIG, 7, **{**run, "seed": 4})
    assert not torch.isclose(whole, other_seed).all(dim=(1, 2, 3)).any()
    assert whole.shape == (7, 1, 4, 4) and whole.min() >= -1 and whole.max() <= 1


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_real_unet_is_batch_size_invariant(sampler):
    unet = tiny_unet(channels=1, attention=False)
    run = dict(steps=3, sampler=sampler, seed=0)
    torch.testing.assert_close(sample_images(unet, SCHEDULER_CONFIG, 5, batch_size=5, **run),
                               sample_images(unet, SCHEDULER_CONFIG, 5, batch_size=2, **run), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pipeline_class,scheduler_class,sampler,eta", [
    (DDIMPipeline, DDIMScheduler, "ddim", 0.5),
    (DDPMPipeline, DDPMScheduler, "ddpm", 0.0),
])
def test_matches_the_diffusers_pipeline_given_the_same_generators(pipeline_class, scheduler_class, sampler, eta):
    unet = tiny_unet(channels=1, attention=False).eval()
    ours = sample_images(unet, SCHEDULER_CONFIG, 3, steps=3, sampler=sampler, eta=eta, seed=5)
    pipeline = pipeline_class(unet=unet, scheduler=scheduler_class.from_config(SCHEDULER_CONFIG))
    pipeline.set_progress_bar_config(disable=True)
    extra = {"eta": eta} if sampler == "ddim" else {}
    theirs = pipeline(batch_size=3, generator=image_generators(5, 0, 3), num_inference_steps=3,
                      output_type="np", **extra).images
    torch.testing.assert_close(ours, torch.from_numpy(theirs).permute(0, 3, 1, 2) * 2 - 1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"sampler": "euler"}, "ddim or ddpm"),
    ({"steps": 0}, "at least 1"),
    ({"steps": T + 1}, "more than"),
    ({"sampler": "ddpm", "eta": 0.5}, "eta"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_sampling_requests_raise(kwargs, message):
    with pytest.raises(DemeError, match=message):
        sample_images(ConstantUNet(0.0), SCHEDULER_CONFIG, 2, **kwargs)


@pytest.mark.parametrize("channels,mode", [(1, "L"), (3, "RGB")])
def test_save_grid_writes_a_png_of_the_expected_size(tmp_path, channels, mode):
    images = torch.linspace(-1, 1, 5).view(5, 1, 1, 1).expand(5, channels, 8, 8)
    path = save_grid(images, tmp_path / "sub" / "grid.png", nrow=3)
    with Image.open(path) as grid:
        assert grid.format == "PNG" and grid.mode == mode
        assert grid.size == (3 * (8 + 2) + 2, 2 * (8 + 2) + 2)
        first, last, padding = grid.getpixel((2, 2)), grid.getpixel((2 + 10 + 7, 2 + 10 + 7)), grid.getpixel((1, 1))
    pixel = (lambda v: (v,) * 3) if mode == "RGB" else (lambda v: v)
    assert (first, last, padding) == (pixel(0), pixel(255), pixel(0))  # -1 -> black, +1 -> white
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]
