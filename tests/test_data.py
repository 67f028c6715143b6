import numpy as np
import pytest
import torch
from PIL import Image

from deme_ray.data import load_images, split_indices
from deme_ray.errors import DemeError


def test_digits_split_is_fixed_and_disjoint():
    train_a, held_a = split_indices(1797, 0.2)
    train_b, held_b = split_indices(1797, 0.2)
    assert np.array_equal(held_a, held_b) and len(held_a) == 360
    assert not set(train_a) & set(held_a) and len(train_a) + len(held_a) == 1797


def test_bundled_digits_in_range_and_shape():
    images = load_images("bundled:digits", 16, 1, 0.2, "held_out")
    assert images.pixels.shape == (360, 1, 16, 16) and images.pixels.dtype == torch.uint8
    batch = images.all()
    assert batch.min() >= -1 and batch.max() <= 1 and batch.std() > 0.3


def test_image_folder_recursive_mixed_modes_and_sizes(user_images):
    images = load_images(str(user_images), 8, 3, 0.25, "train")
    assert images.pixels.shape == (18, 3, 8, 8)
    gray = load_images(str(user_images), 8, 1, 0.25, "held_out")
    assert gray.pixels.shape == (6, 1, 8, 8)


def test_unreadable_images_skipped_with_a_warning(tmp_path, caplog):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(20):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.png").write_bytes(b"not a png")
    images = load_images(str(folder), 8, 3, 0.2, "train")
    assert len(images) == 16
    assert "skipped 1 unreadable image" in caplog.text
    for i in range(3):
        (folder / f"broken{i}.jpg").write_bytes(b"garbage")
    with pytest.raises(DemeError, match="4 of 24 images .* unreadable"):
        load_images(str(folder), 8, 3, 0.2, "train")


def test_empty_or_missing_folder_rejected(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DemeError, match="no images"):
        load_images(str(tmp_path), 8, 3, 0.2, "train")
    with pytest.raises(DemeError, match="does not exist"):
        load_images(str(tmp_path / "missing"), 8, 3, 0.2, "train")
