"""DINOv3 crops: the Gram teacher crops (the global crops' regions at a higher resolution) and the high-res stage's
mixed crop sizes (one size tuple per global batch, drawn from seed and batch position); DINOv2 batches unchanged."""

import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from dinotrain.config import ConfigError, load_config
from dinotrain.data.augmentations import DataAugmentationDINO, MultiResolutionAugmentation
from dinotrain.data.loader import build_train_loader, to_device
from dinotrain.data.resolutions import CropSizes, ResolutionPlan, crop_size_options

TINY = ["train.dataset_path=tiny", "student.patch_size=4", "crops.global_crops_size=16", "crops.local_crops_size=8",
        "crops.local_crops_number=2", "crops.blur_kernel_size=3", "train.num_workers=0"]
# 3 batches of 4 images (seed 7, from sample 8) of the config TINY, digested by `_digest` with the code before the
# DINOv3 crops (commit d81977f): a config with single sizes and no Gram crops must still give these very batches.
DINOV2_BATCHES_SHA256 = "189506e036755b6aa0ce2a16c20ed04c0348cf134542b7f1227bb40dae6d60c1"


def _batches(overrides, world_size=1, rank=0, start=0, n=3):
    cfg = load_config(None, TINY + overrides)
    it = iter(build_train_loader(cfg, rank, world_size, start)[0])
    return [next(it) for _ in range(n)]


def _digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            value = batch[key]
            if isinstance(value, torch.Tensor):
                h.update(key.encode())
                h.update(str(tuple(value.shape)).encode())
                h.update(value.contiguous().numpy().tobytes())
    return h.hexdigest()


def test_single_sizes_give_the_batches_of_before_bit_for_bit():
    batches = _batches(["train.batch_size_per_gpu=4", "train.seed=7"], start=8)
    assert "collated_gram_teacher_crops" not in batches[0]
    assert _digest(batches) == DINOV2_BATCHES_SHA256


def _photo(size=(96, 72)) -> Image.Image:
    """A textured image: neighbouring regions differ, so crops of other regions cannot match by chance."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.Resampling.BICUBIC)


def _no_photometric(**kwargs) -> DataAugmentationDINO:
    return DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, global_crops_size=16, local_crops_size=8,
                                blur_probabilities=(0.0, 0.0, 0.0), color_jitter_probability=0.0,
                                grayscale_probability=0.0, normalize=False, **kwargs)


def _down(crop: torch.Tensor, side: int) -> torch.Tensor:
    """A uint8 crop resized (bicubic, PIL) to side x side."""
    img = Image.fromarray(crop.permute(1, 2, 0).numpy()).resize((side, side), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.mark.parametrize("undistorted", [True, False])
def test_gram_crops_are_the_global_crops_regions_at_their_resolution(undistorted):
    augment = _no_photometric(gram_teacher_crops_size=48, gram_teacher_no_distortions=undistorted)
    image = _photo()
    for seed in range(5):
        torch.manual_seed(seed)
        out = augment(image)
        grams, globals_ = out["gram_teacher_crops"], out["global_crops"]
        assert [g.shape for g in grams] == [(3, 48, 48)] * 2 and [g.shape for g in globals_] == [(3, 16, 16)] * 2
        # view 2 is solarized with p 0.2; undistorted Gram crops skip that, so compare view 1 there
        views = (0,) if undistorted else (0, 1)
        for v in views:
            assert torch.equal(_down(grams[v], 16), globals_[v]), (seed, v)
        assert not torch.equal(_down(grams[1], 16), globals_[0])  # each view its own region


def test_undistorted_gram_crop_is_torchvisions_random_resized_crop_of_the_image():
    """Independent reference: the official pipeline crops the region once at the Gram side with torchvision's
    RandomResizedCrop (bicubic) + flip; with the same seed the first Gram crop is exactly that crop."""
    augment = DataAugmentationDINO((0.3, 1.0), (0.1, 0.3), 2, global_crops_size=16, local_crops_size=8,
                                   normalize=False, gram_teacher_crops_size=48, gram_teacher_no_distortions=True)
    reference = transforms.Compose([
        transforms.RandomResizedCrop(48, scale=(0.3, 1.0), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.RandomHorizontalFlip(0.5), transforms.PILToTensor()])
    image = _photo()
    for seed in range(5):
        torch.manual_seed(seed)
        ours = augment(image)["gram_teacher_crops"][0]
        torch.manual_seed(seed)
        assert torch.equal(ours, reference(image)), seed


def test_no_horizontal_flips_keeps_the_crops_orientation():
    image = _photo()
    flipped_somewhere = False
    for seed in range(8):
        torch.manual_seed(seed)
        never = _no_photometric(gram_teacher_crops_size=48, horizontal_flips=False)(image)["gram_teacher_crops"][0]
        torch.manual_seed(seed)
        region = transforms.RandomResizedCrop(48, scale=(0.3, 1.0),
                                              interpolation=transforms.InterpolationMode.BICUBIC)(image)
        assert torch.equal(never, torch.from_numpy(np.array(region)).permute(2, 0, 1)), seed
        torch.manual_seed(seed)
        maybe = _no_photometric(gram_teacher_crops_size=48)(image)["gram_teacher_crops"][0]
        flipped_somewhere |= torch.equal(maybe, never.flip(-1)) and not torch.equal(maybe, never)
    assert flipped_somewhere  # with flips on, some of the 8 draws flip


def test_gram_crops_are_collated_and_normalised_like_the_global_crops():
    batch = _batches(["train.batch_size_per_gpu=3", "crops.gram_teacher_crops_size=32"], n=1)[0]
    gram = batch["collated_gram_teacher_crops"]
    assert gram.shape == (2 * 3, 3, 32, 32) and gram.dtype == torch.uint8
    assert batch["collated_global_crops"].shape == (6, 3, 16, 16)
    moved = to_device(batch, torch.device("cpu"))
    assert moved["collated_gram_teacher_crops"].dtype == torch.float32
    # view-major like the global crops: rows 0..2 are view 1 of images 0..2, their downsized rows the globals'
    for row in (0, 4):  # (gram_teacher_no_distortions false: both come from the one distorted region)
        assert torch.equal(_down(gram[row], 16), batch["collated_global_crops"][row])


HIGH_RES = {"global_crops_size": [512, 768, 768, 768, 768], "local_crops_size": [112, 112, 168, 224, 336],
            "global_local_crop_pairs_ratios": [0.3, 0.3, 0.3, 0.05, 0.05],
            "gram_teacher_crops_size": [768, 1152, 1152, 1152, 1152]}  # official dinov3_vit7b16_high_res_adapt.yaml


def test_size_tuples_follow_the_ratios_over_many_batches():
    options, ratios = crop_size_options(HIGH_RES)
    assert options[0] == CropSizes(512, 112, 768) and options[4] == CropSizes(768, 336, 1152)
    plan = ResolutionPlan(ratios, seed=0, global_batch=64)
    n = 20000
    counts = np.bincount([plan.index_of_batch(64 * b) for b in range(n)], minlength=5) / n
    sigma = np.sqrt(np.array(ratios) * (1 - np.array(ratios)) / n)
    assert np.all(np.abs(counts - ratios) < 4 * sigma), counts


def test_size_tuple_is_a_function_of_seed_and_batch_position():
    _, ratios = crop_size_options(HIGH_RES)
    a, b = ResolutionPlan(ratios, 3, 8), ResolutionPlan(ratios, 3, 8)
    assert [a.index_at(p) for p in range(400)] == [b.index_at(p) for p in reversed(range(400))][::-1]
    assert len({a.index_at(p) for p in range(16, 24)}) == 1  # one tuple per global batch
    other_seed = ResolutionPlan(ratios, 4, 8)
    assert [a.index_of_batch(8 * k) for k in range(50)] != [other_seed.index_of_batch(8 * k) for k in range(50)]
    assert ResolutionPlan([1.0], 3, 8).index_at(123) == 0


MIXED = ["crops.global_crops_size=[16,24]", "crops.local_crops_size=[8,12]", "crops.gram_teacher_crops_size=[24,32]",
         "crops.global_local_crop_pairs_ratios=[0.5,0.5]", "train.batch_size_per_gpu=2"]


def test_mixed_sizes_one_per_batch_same_on_two_ranks_and_after_resume():
    one = _batches(MIXED, n=8)
    sizes = [b["collated_global_crops"].shape[-1] for b in one]
    assert set(sizes) == {16, 24}  # both tuples drawn within 8 batches (seed 0)
    for b, g in zip(one, sizes):
        assert b["collated_local_crops"].shape[-1] == {16: 8, 24: 12}[g]
        assert b["collated_gram_teacher_crops"].shape[-1] == {16: 24, 24: 32}[g]
        assert b["collated_masks"].shape == (4, (g // 4) ** 2)  # the mask grid follows the batch's size
    # 2 ranks of 1 image: the same global batches (rank r holds image r of each)
    ranks = [_batches(MIXED[:-1] + ["train.batch_size_per_gpu=1"], world_size=2, rank=r, n=8) for r in range(2)]
    for k in range(8):
        for r in range(2):
            got = ranks[r][k]["collated_gram_teacher_crops"]
            assert torch.equal(got, one[k]["collated_gram_teacher_crops"][r::2]), (k, r)
    resumed = _batches(MIXED, start=6, n=5)  # resume after 3 batches of 2
    assert _digest(resumed) == _digest(one[3:])


def test_multi_resolution_augmentation_uses_the_selected_sizes():
    augment = MultiResolutionAugmentation([_no_photometric(), _no_photometric(gram_teacher_crops_size=32)])
    assert "gram_teacher_crops" not in augment(_photo())
    augment.select(1)
    assert augment(_photo())["gram_teacher_crops"][0].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="resolution index"):
        augment.select(2)


def _one_line(overrides: list[str]) -> str:
    with pytest.raises(ConfigError) as err:
        load_config(None, TINY + overrides)
    message = str(err.value)
    assert "\n" not in message, message
    return message


@pytest.mark.parametrize("overrides, words", [
    (["crops.global_crops_size=[16,32]", "crops.local_crops_size=[8,8,8]", "crops.global_local_crop_pairs_ratios=[0.5,0.5]"],
     "list different numbers of resolutions (crops.global_crops_size has 2, crops.local_crops_size has 3"),
    (["crops.global_crops_size=[16,32]", "crops.global_local_crop_pairs_ratios=[0.5,0.4]"], "must sum to 1"),
    (["crops.global_crops_size=[16,32]"], "must list one ratio per resolution"),
    (["crops.global_crops_size=[16,30]", "crops.global_local_crop_pairs_ratios=[0.5,0.5]"],
     "'crops.global_crops_size' = [16, 30] must be a multiple of student.patch_size = 4"),
    (["crops.gram_teacher_crops_size=30"], "'crops.gram_teacher_crops_size' = 30 must be a multiple"),
    (["crops.global_crops_size=[]"], "must be a positive int or a non-empty list"),
    (["crops.global_local_crop_pairs_ratios=[1.5,-0.5]", "crops.global_crops_size=[16,32]"], "must be a number"),
])
def test_bad_size_lists_are_one_line_errors(overrides, words):
    assert words in _one_line(overrides)


def test_rope_backbones_take_local_crops_of_any_side_as_official():
    """Official dinov3_vit7b16_high_res_adapt.yaml pairs 168-px local crops with patch 16 (its patch embedding
    drops the rest); global and Gram crops stay whole patches (the mask grid, the Gram teacher's grid)."""
    from dinotrain.config_schema import _crops_not_in_patches

    cfg = {"student": {"patch_size": 16, "pos_embed_type": "rope"},
           "crops": {"global_crops_size": [512, 768], "local_crops_size": [112, 168], "gram_teacher_crops_size": None}}
    assert _crops_not_in_patches(cfg) is None
    cfg["student"]["pos_embed_type"] = "learned"
    assert "'crops.local_crops_size' = [112, 168] must be a multiple" in _crops_not_in_patches(cfg)
    cfg["student"]["pos_embed_type"], cfg["crops"]["gram_teacher_crops_size"] = "rope", [776, 1152]
    assert "'crops.gram_teacher_crops_size' = [776, 1152] must be a multiple" in _crops_not_in_patches(cfg)


def test_a_continuation_stage_needs_its_first_stage_run(tmp_path):
    required = _one_line(["student.resume_from_teacher_chkpt=null"])  # as the high-res recipe ships it
    assert required.startswith("config key 'student.resume_from_teacher_chkpt' is required but is null: a high-res "
                               "stage without a first-stage run"), required
    missing = _one_line([f"student.resume_from_teacher_chkpt={tmp_path / 'nowhere'}"])
    assert missing.startswith("config key 'student.resume_from_teacher_chkpt'")
    assert "a high-res stage without a first-stage run" in missing and "weights not found" in missing
    (tmp_path / "empty").mkdir()
    assert "neither a run or checkpoint directory" in _one_line([f"student.resume_from_teacher_chkpt={tmp_path / 'empty'}"])
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"")  # a file is taken as weights by name (read when the run starts)
    cfg = load_config(None, TINY + [f"student.resume_from_teacher_chkpt={weights}"])
    assert cfg.student.resume_from_teacher_chkpt == str(weights)
    both = _one_line([f"student.resume_from_teacher_chkpt={weights}", f"student.pretrained_weights={weights}"])
    assert "both set" in both


def test_crop_size_options_refuses_lists_of_other_lengths_without_a_checked_config():
    with pytest.raises(ValueError, match="one length"):
        crop_size_options({"global_crops_size": [16, 32], "local_crops_size": [8, 8, 8],
                           "global_local_crop_pairs_ratios": [0.5, 0.5], "gram_teacher_crops_size": None})
    assert crop_size_options({"global_crops_size": 224, "local_crops_size": 96, "gram_teacher_crops_size": None,
                              "global_local_crop_pairs_ratios": 1.0}) == ([CropSizes(224, 96, None)], [1.0])


def test_a_plan_measures_the_largest_size_tuple_of_the_high_res_stage():
    from dinotrain.plan.step import synthetic_batch

    cfg = load_config(None, TINY + ["crops.global_crops_size=[16,24,24]", "crops.local_crops_size=[8,8,12]",
                                    "crops.gram_teacher_crops_size=[24,32,32]",
                                    "crops.global_local_crop_pairs_ratios=[0.8,0.1,0.1]"])
    batch = synthetic_batch(cfg, batch_size=2, world_size=1)
    assert batch["collated_global_crops"].shape[-1] == 24 and batch["collated_local_crops"].shape[-1] == 12
    assert batch["collated_gram_teacher_crops"].shape == (4, 3, 32, 32)
    assert batch["collated_masks"].shape == (4, 36)
    single = synthetic_batch(load_config(None, TINY), batch_size=2, world_size=1)
    assert single["collated_global_crops"].shape[-1] == 16 and "collated_gram_teacher_crops" not in single
