import math

import pytest
import torch
from diffusers import DDPMScheduler
from hypothesis import given
from hypothesis import strategies as st

from deme_ray.errors import ConfigError
from deme_ray.objective import TimestepSampler, deme_loss, prediction_target, timestep_ranges


def test_equal_ranges_cover_all_timesteps():
    assert timestep_ranges(1000) == [(0, 250), (250, 500), (500, 750), (750, 1000)]
    assert timestep_ranges(1000, num_ranges=3) == [(0, 333), (333, 667), (667, 1000)]
    assert timestep_ranges(1000, boundaries=[0, 100, 1000]) == [(0, 100), (100, 1000)]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"boundaries": [0, 500, 999]}, "end at T=1000"),
        ({"boundaries": [0, 600, 500, 1000]}, "strictly increasing"),
        ({"boundaries": [5, 1000]}, "start at 0"),
        ({"num_ranges": 1001}, "more than the model's 1000 timesteps"),
    ],
)
def test_bad_ranges_rejected(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        timestep_ranges(1000, **kwargs)


@given(st.integers(1, 1000), st.integers(1, 64))
def test_ranges_partition_timesteps(T, n):
    if n > T:
        return
    ranges = timestep_ranges(T, num_ranges=n)
    assert ranges[0][0] == 0 and ranges[-1][1] == T and len(ranges) == n
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:]))


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7])
def test_fraction_of_global_batches_is_p(p):
    sampler = TimestepSampler(250, 500, 1000, p_global=p)
    g = torch.Generator().manual_seed(0)
    n = 4000
    outside = 0
    for _ in range(n):
        t = sampler.sample(8, g)
        outside += bool(((t < 250) | (t >= 500)).any())
    # A global batch of 8 lands entirely inside [250, 500) with probability 0.25**8 (negligible),
    # so the fraction of batches with a timestep outside the range estimates p.
    se = math.sqrt(max(p * (1 - p), 1e-4) / n)
    assert abs(outside / n - p) < 4 * se


def test_pairs_are_antithetic():
    g = torch.Generator().manual_seed(1)
    local = TimestepSampler(250, 500, 1000, p_global=0.0).sample(10, g)
    assert torch.equal(local[5:], 250 + 500 - 1 - local[:5])
    assert ((local >= 250) & (local < 500)).all()
    everywhere = TimestepSampler(250, 500, 1000, p_global=1.0).sample(10, g)
    assert torch.equal(everywhere[5:], 999 - everywhere[:5])
    odd = TimestepSampler(0, 10, 1000, p_global=0.0).sample(7, g)
    assert odd.shape == (7,)


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_target_follows_prediction_type(kind):
    scheduler = DDPMScheduler(prediction_type=kind)
    x0, noise = torch.randn(4, 1, 4, 4), torch.randn(4, 1, 4, 4)
    t = torch.tensor([0, 10, 500, 999])
    expected = {"epsilon": noise, "sample": x0, "v_prediction": scheduler.get_velocity(x0, noise, t)}[kind]
    assert torch.equal(prediction_target(scheduler, x0, noise, t), expected)


class Const(torch.nn.Module):
    """Predicts a constant: makes the loss arithmetic checkable by hand."""

    def __init__(self, value):
        super().__init__()
        self.value = torch.nn.Parameter(torch.tensor(float(value)))

    def forward(self, x, t):
        return type("Out", (), {"sample": torch.zeros_like(x) + self.value})()


def test_loss_is_denoising_plus_weighted_consistency():
    scheduler = DDPMScheduler()
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([3, 7])
    parts = deme_loss(Const(1.0), Const(3.0), scheduler, x0, noise, t, consistency_weight=0.5)
    assert parts.denoise.item() == pytest.approx(1.0)  # (1 - 0)^2
    assert parts.consistency.item() == pytest.approx(4.0)  # (1 - 3)^2
    assert parts.total.item() == pytest.approx(1.0 + 0.5 * 4.0)
    assert deme_loss(Const(1.0), None, scheduler, x0, noise, t, 0.5).consistency is None
