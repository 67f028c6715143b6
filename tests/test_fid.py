"""FID: the committed digits classifier, reference statistics and their cache, scores, and the
clear failure of the Inception feature network without local weights."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.configuration_utils import FrozenDict
from diffusers.models.unets.unet_2d import UNet2DOutput
from torch import nn

from deme_ray import fid
from deme_ray.data import load_images
from deme_ray.errors import DemeError


@pytest.fixture(scope="module")
def held_out() -> torch.Tensor:
    return load_images("bundled:digits", 16, 1, 0.2, "held_out").all()


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> fid.ReferenceStats:
    return fid.reference_stats("bundled:digits", 16, 1, 0.2, cache_dir=tmp_path_factory.mktemp("fid-cache"))


def test_committed_classifier_reaches_97_percent_on_held_out_digits():
    classifier = fid.load_digits_classifier()
    accuracy = fid.classifier_accuracy(classifier, *fid.digits_split("held_out"))
    recorded = json.loads((fid.CLASSIFIER_DIR / fid.CLASSIFIER_CONFIG).read_text())
    assert accuracy >= 0.97
    assert recorded["held_out_accuracy"] == pytest.approx(accuracy, abs=1e-3)
    assert sum(p.stat().st_size for p in fid.CLASSIFIER_DIR.iterdir()) < 1_000_000


def test_training_writes_the_folder_atomically_and_refuses_a_weak_classifier(tmp_path):
    out = tmp_path / "classifier"
    with pytest.raises(DemeError, match="held-out accuracy"):
        fid.train_digits_classifier(out, epochs=1, min_accuracy=1.01)
    assert list(tmp_path.iterdir()) == []
    fid.train_digits_classifier(out, epochs=1, min_accuracy=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["classifier"]
    config = json.loads((out / fid.CLASSIFIER_CONFIG).read_text())
    assert 0 < config["held_out_accuracy"] <= 1 and config["training"]["epochs"] == 1
    assert fid.load_digits_classifier(out).architecture() == config["architecture"]


def test_digits_features_accept_any_size_and_rgb():
    network = fid.feature_network("bundled:digits", None)
    grey = torch.rand(3, 1, 16, 16)
    rgb_large = torch.nn.functional.interpolate(grey, size=32, mode="bilinear").expand(-1, 3, -1, -1)
    with torch.no_grad():
        assert network(grey).shape == network(rgb_large).shape == (3, network.num_features)


def test_fid_of_held_out_against_itself_is_zero_and_of_noise_is_large(reference, held_out):
    assert reference.num_samples == len(held_out) and reference.mean.dtype == torch.float64
    assert abs(fid.fid_score(held_out, reference)) < 1e-6
    noise = torch.rand(len(held_out), 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert fid.fid_score(noise, reference) > 100


def test_reference_stats_are_computed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    computed = []
    real_statistics = fid.feature_statistics

    def counting_statistics(*args, **kwargs):
        computed.append(1)
        return real_statistics(*args, **kwargs)

    monkeypatch.setattr(fid, "feature_statistics", counting_statistics)
    first = fid.reference_stats("bundled:digits", 16, 1, 0.2, cache_dir=tmp_path)
    assert len(computed) == 1 and len(list(tmp_path.glob("reference-*.safetensors"))) == 1
    second = fid.reference_stats("bundled:digits", 16, 1, 0.2, cache_dir=tmp_path)
    assert len(computed) == 1
    assert torch.equal(first.cov, second.cov) and first.num_samples == second.num_samples
    fid.reference_stats("bundled:digits", 16, 1, 0.3, cache_dir=tmp_path)  # another split: another entry
    assert len(computed) == 2 and len(list(tmp_path.glob("reference-*.safetensors"))) == 2


def test_fid_refuses_a_reference_made_by_other_weights(reference, held_out):
    stale = fid.ReferenceStats(reference.feature, "0" * 64, reference.mean, reference.cov, reference.num_samples)
    with pytest.raises(DemeError, match="recompute"):
        fid.fid_score(held_out, stale)


def test_inception_without_a_local_weights_file_says_how_to_pass_one(tmp_path):
    with pytest.raises(DemeError, match="local InceptionV3 weights file.*evaluate.inception_weights"):
        fid.feature_network("inception", None)
    with pytest.raises(DemeError, match="does not exist"):
        fid.reference_stats("bundled:digits", 16, 1, 0.2, "inception", tmp_path / "missing.pth", cache_dir=tmp_path)
    with pytest.raises(DemeError, match="unknown FID feature network"):
        fid.feature_network("clip", None)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_without_torch_fidelity_says_what_to_install(tmp_path):
    weights = tmp_path / "inception.pth"
    weights.write_bytes(b"not really weights")
    with pytest.raises(DemeError, match="pip install torch-fidelity"):
        fid.feature_network("inception", weights)


class ZeroNoiseUNet(nn.Module):
    """Predicts zero noise: sampling then just rescales the initial noise, enough to exercise the path."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.config = FrozenDict(sample_size=16, in_channels=1, out_channels=1)

    def forward(self, sample, timestep):
        return UNet2DOutput(sample=torch.zeros_like(sample) + self.anchor)


def test_evaluate_fid_samples_and_scores(reference):
    scheduler_config = dict(DDPMScheduler(num_train_timesteps=50).config)
    score = fid.evaluate_fid(ZeroNoiseUNet(), scheduler_config, 8, 0, reference, steps=2)
    assert score == pytest.approx(fid.evaluate_fid(ZeroNoiseUNet(), scheduler_config, 8, 0, reference, steps=2))
    assert score > 0
