from __future__ import annotations

import math
import shutil

import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from deme_ray import load_unet
from deme_ray.errors import DemeError
from deme_ray.merge import (
    METHODS,
    MergeMethod,
    merge_folders,
    merge_state_dicts,
    merge_tensor,
    parse_weights,
    task_vectors,
)
from deme_ray.model import WEIGHTS_NAME, ProjectedUNet2DModel, copy_model, save_model_folder, with_identity_projections

from .conftest import tiny_unet

NUM_EXPERTS = 3


def perturbed(unet: UNet2DModel, seed: int) -> UNet2DModel:
    """An 'expert': the base plus seeded noise, as if finetuned."""
    expert = copy_model(unet)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in expert.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return expert


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(base folder, expert folders): a projected base, as `deme-ray train` saves it, and 3 experts."""
    root = tmp_path_factory.mktemp("merge-models")
    base = with_identity_projections(tiny_unet(channels=1, widths=(4, 8), attention=False))
    base_dir = save_model_folder(base, DDPMScheduler(num_train_timesteps=100), root / "base")
    expert_dirs = [
        save_model_folder(perturbed(base, seed), DDPMScheduler(num_train_timesteps=100), root / f"expert{seed}")
        for seed in range(NUM_EXPERTS)
    ]
    return base_dir, expert_dirs


def weights_of(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS_NAME)


def write_folder(folder, state_dict, like) -> None:
    """A UNet folder holding ``state_dict`` with the config of folder ``like``."""
    folder.mkdir(parents=True)
    shutil.copyfile(like / "config.json", folder / "config.json")
    save_file(state_dict, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def assert_close_to(actual: dict, expected: dict) -> None:
    """Equal within fp32 rounding of base + (expert - base)."""
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        scale = max(1.0, tensor.abs().max().item())
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=1e-6 * scale)


# --- the arithmetic, on tensors small enough to check by hand ---


def test_linear_is_the_weighted_sum_of_task_vectors():
    base = torch.tensor([1.0, 2.0, 3.0])
    experts = [torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 4.0, 3.0])]  # tau: [1,0,-1], [-1,2,0]
    merged = merge_tensor(base, experts, [0.5, 0.25], "linear")
    assert torch.equal(merged, torch.tensor([1.25, 2.5, 2.5]))
    assert torch.equal(merge_tensor(base, experts, [-1.0, 0.0], "linear"), torch.tensor([0.0, 2.0, 4.0]))


def test_ties_trims_elects_a_sign_and_takes_the_disjoint_mean():
    base = torch.arange(5.0)
    taus = [
        torch.tensor([3.0, -1.0, 0.5, -2.0, 0.1]),  # top 3 by magnitude: [3, -1, 0, -2, 0]
        torch.tensor([-1.5, -2.0, 1.0, 0.2, -4.0]),  # [-1.5, -2, 0, 0, -4], weight 2
        torch.tensor([2.0, 0.5, -3.0, 0.3, 0.1]),  # [2, 0.5, -3, 0, 0]
    ]
    weights = [1.0, 2.0, 1.0]
    # weighted sum [2, -4.5, -3, -2, -8] elects [+, -, -, -, -]; agreeing entries only:
    expected_delta = torch.tensor([(3 + 2) / 2, (-1 - 4) / 3, -3.0, -2.0, -8 / 2])
    merged = merge_tensor(base, [base + tau for tau in taus], weights, "ties", density=0.6)
    torch.testing.assert_close(merged, base + expected_delta)


def test_ties_leaves_an_element_without_a_winning_sign_at_the_base():
    base = torch.zeros(2)
    experts = [torch.tensor([1.0, 1.0]), torch.tensor([-1.0, 2.0])]
    merged = merge_tensor(base, experts, [1.0, 1.0], "ties", density=1.0)
    assert torch.equal(merged, torch.tensor([0.0, 1.5]))


def test_dare_is_seeded_and_keeps_the_expectation():
    base = torch.zeros(200_000)
    expert = torch.ones(200_000)
    first = merge_tensor(base, [expert], [1.0], "dare_linear", density=0.3, seed=7, name="w")
    assert torch.equal(first, merge_tensor(base, [expert], [1.0], "dare_linear", density=0.3, seed=7, name="w"))
    assert not torch.equal(first, merge_tensor(base, [expert], [1.0], "dare_linear", density=0.3, seed=8, name="w"))
    kept = first != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / 0.3))
    assert abs(first.mean().item() - 1.0) < 0.02


def test_dare_masks_do_not_depend_on_tensor_order():
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(50, generator=generator), "b": torch.randn(50, generator=generator)}
    vectors = task_vectors(base, [{k: v + 1 for k, v in base.items()}, {k: v - 2 for k, v in base.items()}])
    forward = merge_state_dicts(base, vectors, [0.5, 0.5], "dare_ties", density=0.5, seed=3)
    reversed_base = dict(reversed(list(base.items())))
    backward = merge_state_dicts(reversed_base, vectors, [0.5, 0.5], "dare_ties", density=0.5, seed=3)
    assert all(torch.equal(forward[k], backward[k]) for k in base)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_non_float_tensors_are_copied_and_dtypes_kept(method):
    base = {"weight": torch.ones(4, dtype=torch.float16), "num_batches_tracked": torch.tensor(5, dtype=torch.int64)}
    expert = {"weight": torch.full((4,), 3.0, dtype=torch.float16), "num_batches_tracked": torch.tensor(9)}
    merged = merge_state_dicts(base, task_vectors(base, [expert]), [1.0], method, density=1.0)
    assert merged["num_batches_tracked"].dtype == torch.int64 and merged["num_batches_tracked"].item() == 5
    assert merged["weight"].dtype == torch.float16 and torch.equal(merged["weight"], expert["weight"])
    counter = torch.tensor([1, 2], dtype=torch.int32)
    assert torch.equal(merge_tensor(counter, [counter + 10], [1.0], method), counter)


def test_methods_are_parameterisations_of_one_merge():
    assert METHODS["linear"] == MergeMethod(sparsify="none", sign_consensus=False)
    assert METHODS["dare_ties"] == MergeMethod(sparsify="random", sign_consensus=True)
    base, expert = torch.zeros(3), torch.tensor([1.0, -2.0, 3.0])
    custom = MergeMethod(sparsify="magnitude", sign_consensus=False)  # trim without election
    assert torch.equal(merge_tensor(base, [expert], [0.5], custom, density=0.34), torch.tensor([0.0, 0.0, 1.5]))


# --- folders: exactness, output, and the in-memory path agreeing with the streamed one ---


@pytest.mark.parametrize("method", sorted(METHODS))
def test_all_zero_weights_give_the_base_bit_for_bit(folders, tmp_path, method):
    base_dir, expert_dirs = folders
    out = merge_folders(base_dir, expert_dirs, [0.0] * NUM_EXPERTS, tmp_path / "merged", method, density=0.5)
    base, merged = weights_of(base_dir), weights_of(out)
    assert merged.keys() == base.keys()
    assert all(torch.equal(merged[name], tensor) for name, tensor in base.items())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_one_hot_weight_gives_that_expert(folders, tmp_path, method):
    base_dir, expert_dirs = folders
    out = merge_folders(base_dir, expert_dirs, [0.0, 1.0, 0.0], tmp_path / "merged", method, density=1.0)
    assert_close_to(weights_of(out), weights_of(expert_dirs[1]))


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_single_expert_at_full_density_gives_that_expert(folders, tmp_path, method):
    base_dir, expert_dirs = folders
    out = merge_folders(base_dir, expert_dirs[2:], [1.0], tmp_path / "merged", method, density=1.0)
    assert_close_to(weights_of(out), weights_of(expert_dirs[2]))


def test_merged_folder_loads_and_records_the_merge(folders, tmp_path):
    base_dir, expert_dirs = folders
    out = merge_folders(base_dir, expert_dirs, [0.1, 0.2, 0.5], tmp_path / "merged", "dare_ties", seed=4, fid=12.5)
    unet = load_unet(out)
    assert isinstance(unet, ProjectedUNet2DModel)
    with torch.no_grad():
        assert unet(torch.randn(1, 1, 8, 8), torch.tensor([3])).sample.shape == (1, 1, 8, 8)
    assert (out / "scheduler_config.json").read_text() == (base_dir / "scheduler_config.json").read_text()
    with safe_open(out / WEIGHTS_NAME, framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    card = (out / "README.md").read_text()
    for expected in ("0.1,0.2,0.5", "`dare_ties`", "Density: 0.5", "Seed: 4", "FID: 12.5000", str(base_dir.resolve())):
        assert expected in card
    assert all(str(d.resolve()) in card for d in expert_dirs)
    linear_card = (merge_folders(base_dir, expert_dirs, [1, 0, 0], tmp_path / "linear") / "README.md").read_text()
    assert "FID: not measured" in linear_card and "Density" not in linear_card and "Seed" not in linear_card
    assert sorted(p.name for p in tmp_path.iterdir()) == ["linear", "merged"]


def test_in_memory_merge_matches_the_folder_merge(folders, tmp_path):
    base_dir, expert_dirs = folders
    weights = [0.3, -0.2, 0.6]
    out = merge_folders(base_dir, expert_dirs, weights, tmp_path / "merged", "dare_ties", density=0.5, seed=1)
    base = weights_of(base_dir)
    vectors = task_vectors(base, [weights_of(d) for d in expert_dirs])
    in_memory = merge_state_dicts(base, vectors, weights, "dare_ties", density=0.5, seed=1)
    merged = weights_of(out)
    assert all(torch.equal(merged[name], tensor) for name, tensor in in_memory.items())


def test_folder_merge_copies_non_float_tensors(folders, tmp_path):
    base_dir, expert_dirs = folders
    base = {**weights_of(base_dir), "step": torch.tensor([7], dtype=torch.int64)}
    expert = {**weights_of(expert_dirs[0]), "step": torch.tensor([99], dtype=torch.int64)}
    write_folder(tmp_path / "base", base, base_dir)
    write_folder(tmp_path / "expert", expert, base_dir)
    out = merge_folders(tmp_path / "base", [tmp_path / "expert"], [1.0], tmp_path / "merged", "ties", density=1.0)
    assert torch.equal(weights_of(out)["step"], torch.tensor([7]))


# --- validation: one clear line, and nothing left behind ---


def bad_folder(kind: str, folders, tmp_path):
    """An expert folder broken in one way."""
    base_dir, expert_dirs = folders
    folder = tmp_path / kind
    state = weights_of(expert_dirs[0])
    name = sorted(state)[0]
    if kind == "no-config":
        folder.mkdir()
        shutil.copyfile(expert_dirs[0] / WEIGHTS_NAME, folder / WEIGHTS_NAME)
    elif kind == "no-weights":
        folder.mkdir()
        shutil.copyfile(expert_dirs[0] / "config.json", folder / "config.json")
    elif kind == "missing-tensor":
        write_folder(folder, {k: v for k, v in state.items() if k != name}, base_dir)
    elif kind == "extra-tensor":
        write_folder(folder, {**state, "zz.extra": torch.zeros(2)}, base_dir)
    elif kind == "wrong-shape":
        write_folder(folder, {**state, name: torch.zeros(3, 1)}, base_dir)
    elif kind == "truncated":
        shutil.copytree(expert_dirs[0], folder)
        data = (folder / WEIGHTS_NAME).read_bytes()
        (folder / WEIGHTS_NAME).write_bytes(data[: len(data) // 2])
    return folder, name


@pytest.mark.parametrize(
    "kind, message",
    [
        ("no-config", r"no-config has no config\.json: point at a diffusers UNet folder"),
        ("no-weights", r"no-weights has no diffusion_pytorch_model\.safetensors"),
        ("missing-tensor", r"lacks tensor '{name}' that .* has"),
        ("extra-tensor", r"has tensor 'zz\.extra' that .* lacks"),
        ("wrong-shape", r"tensor '{name}' has shape \(3, 1\) in .*wrong-shape.* but \(4,\) in .*base"),
        ("truncated", r"truncated/diffusion_pytorch_model\.safetensors is not a valid safetensors file"),
    ],
)
def test_bad_expert_folders_are_named_and_leave_nothing(folders, tmp_path, kind, message):
    base_dir, expert_dirs = folders
    folder, name = bad_folder(kind, folders, tmp_path)
    out = tmp_path / "out" / "merged"
    with pytest.raises(DemeError, match=message.format(name=name.replace(".", r"\."))):
        merge_folders(base_dir, [expert_dirs[1], folder], [0.5, 0.5], out)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"weights": [0.5]}, r"got 1 merge weights for 3 experts"),
        ({"weights": [0.5, math.nan, 0.1]}, r"merge weight nan is not a finite number"),
        ({"weights": [0.5, math.inf, 0.1]}, r"merge weight inf is not a finite number"),
        ({"density": 0.0}, r"merge density 0\.0 is outside \(0, 1\]"),
        ({"density": 1.5}, r"merge density 1\.5 is outside \(0, 1\]"),
        ({"method": "slerp"}, r"unknown merge method 'slerp': choose one of linear, ties, dare_linear, dare_ties"),
    ],
)
def test_bad_merge_settings_are_rejected(folders, tmp_path, kwargs, message):
    base_dir, expert_dirs = folders
    settings = {"weights": [0.2, 0.3, 0.5], **kwargs}
    with pytest.raises(DemeError, match=message):
        merge_folders(base_dir, expert_dirs, out_dir=tmp_path / "out" / "merged", **settings)
    assert not (tmp_path / "out").exists()


def test_merging_into_an_input_folder_is_refused(folders):
    base_dir, expert_dirs = folders
    with pytest.raises(DemeError, match="is one of the merge inputs"):
        merge_folders(base_dir, expert_dirs, [0.2, 0.3, 0.5], expert_dirs[0])


def test_a_failed_write_keeps_the_previous_output_and_no_temp_folder(folders, tmp_path, monkeypatch):
    base_dir, expert_dirs = folders
    out = merge_folders(base_dir, expert_dirs, [0.2, 0.3, 0.5], tmp_path / "merged")
    before = weights_of(out)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr("deme_ray.merge.SafetensorsWriter.write", disk_full)
    with pytest.raises(OSError, match="No space left"):
        merge_folders(base_dir, expert_dirs, [0.9, 0.9, 0.9], out)
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]
    assert all(torch.equal(before[k], v) for k, v in weights_of(out).items())


def test_state_dict_merge_checks_task_vectors_against_the_base():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(DemeError, match=r"task vector 0 lacks tensor 'b'"):
        merge_state_dicts(base, [{"a": torch.ones(2)}], [1.0])
    with pytest.raises(DemeError, match=r"expert 0 has tensor 'c' that the base lacks"):
        task_vectors(base, [{**base, "c": torch.zeros(1)}])


def test_parse_weights():
    assert parse_weights("0.1,0.1,0.2,0.5") == [0.1, 0.1, 0.2, 0.5]
    assert parse_weights(" 1, -0.5 ") == [1.0, -0.5]
    with pytest.raises(DemeError, match=r"merge weight 'abc' in '0\.1,abc' is not a number"):
        parse_weights("0.1,abc")
    with pytest.raises(DemeError, match=r"merge weight '' in '0\.1,' is not a number"):
        parse_weights("0.1,")
    for text in ("0.1,nan", "inf,0.2"):
        with pytest.raises(DemeError, match="is not a finite number"):
            parse_weights(text)
