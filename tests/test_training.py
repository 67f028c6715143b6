"""The pure-PyTorch training core, without Ray."""

import torch

from deme_ray.data import load_images
from deme_ray.model import copy_model, load_base, with_identity_projections
from deme_ray.pretrain import digits_unet
from deme_ray.objective import TimestepSampler
from deme_ray.training import ExpertTrainer, StepSettings, range_loss


def make_trainer(lo=0, hi=250, p_global=0.3, seed=0, lr=1e-4, consistency_weight=1.0, steps_images=None):
    base = load_base("bundled:digits", channel_projection=True)
    images = steps_images or load_images("bundled:digits", 16, 1, 0.2, "train")
    trainer = ExpertTrainer(
        copy_model(base.unet),
        copy_model(base.unet),
        base.scheduler,
        images,
        TimestepSampler(lo, hi, base.num_train_timesteps, p_global),
        StepSettings(learning_rate=lr, batch_size=16, consistency_weight=consistency_weight, ema_decay=0.999),
        seed=seed,
    )
    return base, trainer


def test_teacher_is_frozen_and_unchanged_by_training():
    base, trainer = make_trainer()
    before = {k: v.clone() for k, v in trainer.teacher.state_dict().items()}
    for _ in range(3):
        metrics = trainer.train_step()
    assert metrics["consistency_loss"] > 0
    assert all(not p.requires_grad for p in trainer.teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in trainer.teacher.state_dict().items())
    changed = [k for k, v in trainer.module.state_dict().items() if not torch.equal(before[k], v)]
    assert changed, "the student should have moved"


def test_loss_on_the_experts_own_range_goes_down():
    """From an untrained digits UNet (the converged bundled base moves by less than the probe's noise
    in a few steps): the training loop must lower the loss on the expert's own range."""
    base = load_base("bundled:digits", channel_projection=True)
    images = load_images("bundled:digits", 16, 1, 0.2, "train")
    trainer = ExpertTrainer(
        with_identity_projections(digits_unet()), None, base.scheduler, images,
        TimestepSampler(0, 250, 1000, p_global=0.0),
        StepSettings(learning_rate=1e-3, batch_size=32, consistency_weight=0.0, ema_decay=0.999),
        seed=0,
    )
    probe = images.all()[:256]
    before = range_loss(trainer.module, base.scheduler, probe, 0, 250, seed=3)
    for _ in range(30):
        trainer.train_step()
    after = range_loss(trainer.module, base.scheduler, probe, 0, 250, seed=3)
    assert after < 0.5 * before, (before, after)


def test_checkpoint_resume_is_bit_identical(tmp_path):
    _, straight = make_trainer(seed=5)
    for _ in range(4):
        straight.train_step()
    _, first = make_trainer(seed=5)
    for _ in range(2):
        first.train_step()
    first.save_checkpoint(tmp_path)
    _, resumed = make_trainer(seed=999)  # a different seed: everything must come from the checkpoint
    resumed.load_checkpoint(tmp_path)
    for _ in range(2):
        resumed.train_step()
    assert resumed.step == 4
    for (name, a), b in zip(straight.module.state_dict().items(), resumed.module.state_dict().values()):
        assert torch.equal(a, b), name
    for a, b in zip(straight.ema.shadow_params, resumed.ema.shadow_params):
        assert torch.equal(a, b)


def test_same_seed_same_weights():
    results = []
    for _ in range(2):
        _, trainer = make_trainer(seed=11)
        trainer.train_step()
        results.append(trainer.ema_model().state_dict())
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
