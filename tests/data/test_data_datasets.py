"""ImageFolderDataset: layouts, errors, and corrupt files that are skipped instead of fatal."""

import logging

import pytest
import torch

from dinotrain.data import ImageFolderDataset


def test_labelled_folder_sorted_classes_nested_and_all_extensions(tmp_path, write_image):
    write_image(tmp_path / "cat" / "a.PNG")
    write_image(tmp_path / "cat" / "deep" / "er" / "b.jpeg")
    write_image(tmp_path / "ant" / "c.JPG")
    write_image(tmp_path / "ant" / "d.bmp")
    write_image(tmp_path / "bee" / "e.webp")
    write_image(tmp_path / "bee" / "f.tif")
    write_image(tmp_path / "bee" / "g.TIFF")
    (tmp_path / "bee" / "notes.txt").write_text("not an image")
    (tmp_path / "empty_class").mkdir()
    write_image(tmp_path / ".hidden" / "h.png")

    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == ["ant", "bee", "cat"]
    assert len(ds) == 7
    names = {ds.path(i).name: ds.label(i) for i in range(len(ds))}
    assert names == {"c.JPG": 0, "d.bmp": 0, "e.webp": 1, "f.tif": 1, "g.TIFF": 1, "a.PNG": 2, "b.jpeg": 2}
    assert list(ds.targets) == [ds.label(i) for i in range(len(ds))]


def test_flat_folder_is_unlabelled_and_images_are_rgb(tmp_path, write_image):
    write_image(tmp_path / "x.png", mode="L")
    write_image(tmp_path / "y.png", mode="RGBA")
    write_image(tmp_path / "z.png", mode="P")
    ds = ImageFolderDataset(tmp_path)
    assert ds.classes == []
    assert list(ds.targets) == [-1, -1, -1]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (24, 20) and label == -1


def test_transform_is_applied(tmp_path, write_image):
    write_image(tmp_path / "a" / "x.png")
    ds = ImageFolderDataset(tmp_path, transform=lambda img: img.size)
    assert ds[0] == ((24, 20), 0)


def test_loose_images_next_to_class_folders_are_ignored_with_warning(tmp_path, write_image, caplog):
    write_image(tmp_path / "a" / "x.png")
    write_image(tmp_path / "loose.png")
    with caplog.at_level(logging.WARNING, logger="dinotrain.data"):
        ds = ImageFolderDataset(tmp_path)
    assert len(ds) == 1 and "ignoring 1 image" in caplog.text


def test_missing_root_raises_file_not_found_naming_it(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolderDataset(missing)


def test_folder_without_images_raises_value_error_naming_it_and_extensions(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"no images found under .*\.jpg.*\.tiff"):
        ImageFolderDataset(tmp_path)


def test_file_as_root_raises_value_error(tmp_path, write_image):
    path = write_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="not a folder"):
        ImageFolderDataset(path)


def _folder_with_one_corrupt_image(root, write_image):
    for i in range(5):
        write_image(root / "a" / f"{i}.png", size=(20, 20))
    (root / "a" / "x.png").write_bytes(b"\x89PNG garbage, definitely not an image" * 10)
    return root


def test_corrupt_image_returns_none_and_logs_warning(tmp_path, write_image, caplog):
    _folder_with_one_corrupt_image(tmp_path, write_image)
    ds = ImageFolderDataset(tmp_path)
    index = [ds.path(i).name == "x.png" for i in range(len(ds))].index(True)
    with caplog.at_level(logging.WARNING, logger="dinotrain.data"):
        assert ds[index] is None
    assert "x.png" in caplog.text
    assert ds[(index + 1) % len(ds)] is not None


def test_truncated_image_returns_none(tmp_path, write_image):
    path = write_image(tmp_path / "t.jpg", size=(64, 64))
    path.write_bytes(path.read_bytes()[:200])
    assert ImageFolderDataset(tmp_path)[0] is None


@pytest.mark.parametrize("num_workers", [0, 2])
def test_training_loader_replaces_and_counts_corrupt_images_across_workers(tmp_path, write_image, num_workers):
    from dinotrain.config import load_config
    from dinotrain.data.loader import build_train_loader

    _folder_with_one_corrupt_image(tmp_path, write_image)
    cfg = load_config(None, [f"train.dataset_path={tmp_path}", "student.patch_size=4", "crops.global_crops_size=16",
                             "crops.local_crops_size=8", "crops.local_crops_number=1", "crops.blur_kernel_size=3",
                             "train.batch_size_per_gpu=3", f"train.num_workers={num_workers}"])
    loader, size = build_train_loader(cfg, rank=0, world_size=1, start_position=0)
    batches = [b for b, _ in zip(loader, range(2))]  # one epoch: every file drawn once, the corrupt one replaced
    assert size == 6
    assert sum(b["n_skipped"] for b in batches) >= 1
    assert sum(len(b["labels"]) for b in batches) == 6  # batches stay full
    assert all(b["collated_global_crops"].shape[1:] == torch.Size([3, 16, 16]) for b in batches)
