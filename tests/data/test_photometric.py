"""The fast photometric steps against torchvision's PIL transforms, which the official pipeline runs: same random
draws, bit-identical where Pillow does the work, within a grey level for the blur, a few levels for the hue."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from dinotrain.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO
from dinotrain.data.augmentations import RandomResizedCropFlip
from dinotrain.data.photometric import ColourDistortion, RandomGaussianBlur, ToNormalizedTensor, shift_hue


def photo(size=(96, 72), seed=0):
    """A smooth photo-like image: colour gradients plus mild grain."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]] / max(size)
    base = np.stack([np.sin(6 * x + seed), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 100 + 128
    return Image.fromarray(np.clip(base + rng.normal(0, 4, base.shape), 0, 255).astype(np.uint8))


def noise(size=64, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def levels(a, b):
    return np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))


def official_augmentation(jitter=(0.4, 0.4, 0.2, 0.1), blur=(1.0, 0.1, 0.5), kernel=9):
    """The per-view chains exactly as the official code composes them from torchvision (pre-fast-path dinotrain)."""
    colour = T.Compose([T.RandomApply([T.ColorJitter(*jitter)], p=0.8), T.RandomGrayscale(p=0.2)])
    norm = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def blur_p(p):
        return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)

    return (T.Compose([colour, blur_p(blur[0]), norm]),
            T.Compose([colour, blur_p(blur[1]), T.RandomSolarize(128, 0.2), norm]),
            T.Compose([colour, blur_p(blur[2]), norm]))


def run_both(jitter, seed):
    ours = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 4, global_crops_size=48, local_crops_size=24,
                                color_jitter=jitter, blur_kernel_size=9)
    g1, g2, loc = official_augmentation(jitter)
    image = photo(seed=seed)
    torch.manual_seed(seed)
    fast = ours(image)
    after_fast = torch.rand(1)
    torch.manual_seed(seed)
    ref = [g1(ours.geometric_global(image)), g2(ours.geometric_global(image))]
    ref += [loc(ours.geometric_local(image)) for _ in range(4)]
    after_ref = torch.rand(1)
    assert torch.equal(after_fast, after_ref), "the fast path drew a different number of random numbers"
    return fast["global_crops"] + fast["local_crops"], ref


@pytest.mark.parametrize("seed", range(6))
def test_views_equal_torchvisions_without_hue(seed):
    """Hue off: only the blur's summation order differs from the official chain (at most one grey level)."""
    fast, ref = run_both((0.4, 0.4, 0.2, 0.0), seed)
    one_level = 1 / (255 * min(IMAGENET_STD)) + 1e-5
    for a, b in zip(fast, ref):
        assert a.shape == b.shape and a.is_contiguous()
        assert (a - b).abs().max() <= one_level
        assert (a == b).float().mean() >= 0.99


@pytest.mark.parametrize("seed", range(6))
def test_views_match_torchvisions_with_the_official_jitter(seed):
    """With hue jitter the two 8-bit HSV round trips differ: about a grey level on average on saturated colours
    (measured 0.0-1.6), more on a few pixels (measured <= 14)."""
    fast, ref = run_both((0.4, 0.4, 0.2, 0.1), seed)
    for a, b in zip(fast, ref):
        level_diff = ((a - b).abs() * torch.tensor(IMAGENET_STD)[:, None, None] * 255).round()
        assert level_diff.max() <= 20 and level_diff.mean() <= 2.0


@pytest.mark.parametrize("sigma", [0.1, 0.8, 2.0])
@pytest.mark.parametrize("kernel", [3, 9])
def test_blur_matches_torchvision(sigma, kernel):
    for image in (photo(), noise()):
        diff = levels(RandomGaussianBlur(1.0, kernel).blur(image, sigma), TF.gaussian_blur(image, kernel, sigma))
        assert diff.max() <= 1 and (diff == 0).mean() >= 0.999


@pytest.mark.parametrize("factor", [-0.1, -0.03, 0.0, 0.05, 0.1, 0.5])
def test_hue_shift_close_to_torchvision(factor):
    """Both round-trip through an 8-bit HSV, with different roundings (Pillow's own round trip moves noise pixels
    by up to 6 levels): about one level apart on average, up to ~12 on saturated colours."""
    for image in (photo(), noise()):
        diff = levels(shift_hue(image, factor), TF.adjust_hue(image, factor))
        assert diff.max() <= 16 and diff.mean() <= 1.5
        if 0.05 <= abs(factor) <= 0.25:  # the same rotation, not the opposite one (+-0.5 are both a half turn)
            assert diff.mean() < 0.25 * levels(shift_hue(image, factor), TF.adjust_hue(image, -factor)).mean()
            assert levels(shift_hue(image, factor), image).mean() > 4


def test_normalised_tensor_is_bit_identical():
    image = photo()
    ref = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(image)
    ours = ToNormalizedTensor(IMAGENET_MEAN, IMAGENET_STD)(image)
    assert torch.equal(ours, ref) and ours.is_contiguous()


def test_colour_distortion_draws_like_torchvision():
    """Same decisions and factors as RandomApply(ColorJitter) + RandomGrayscale (hue off: bit-identical)."""
    ours = ColourDistortion((0.4, 0.4, 0.2, 0.0), 0.8, 0.2)
    ref = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.0)], p=0.8), T.RandomGrayscale(p=0.2)])
    for seed in range(20):
        torch.manual_seed(seed)
        a = ours(photo(seed=seed))
        torch.manual_seed(seed)
        b = ref(photo(seed=seed))
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("size,scale,image_size", [(48, (0.32, 1.0), (96, 72)), (24, (0.05, 0.32), (96, 72)),
                                                   (32, (0.4, 1.0), (32, 32)), (16, (0.1, 0.4), (20, 20))])
def test_crop_and_flip_bit_identical_to_torchvision(size, scale, image_size):
    ours = RandomResizedCropFlip(size, scale)
    ref = T.Compose([T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
                     T.RandomHorizontalFlip(0.5)])
    for seed in range(20):
        image = photo(image_size, seed)
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = ref(image)
        assert a.size == (size, size) and np.array_equal(np.asarray(a), np.asarray(b))


def test_uint8_crops_normalised_later_equal_the_normalised_crops():
    """The training loader's uint8 crops, normalised by to_device, are bit for bit the worker-normalised ones."""
    from dinotrain.data.loader import to_device

    kwargs = dict(global_crops_size=32, local_crops_size=16)
    floats = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, **kwargs)
    pixels = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, normalize=False, **kwargs)
    torch.manual_seed(0)
    a = floats(photo())
    torch.manual_seed(0)
    b = pixels(photo())
    assert all(c.dtype == torch.uint8 for c in b["global_crops"] + b["local_crops"])
    batch = {"collated_global_crops": torch.stack(b["global_crops"]),
             "collated_local_crops": torch.stack(b["local_crops"]), "labels": torch.zeros(2, dtype=torch.long)}
    moved = to_device(batch, torch.device("cpu"))
    assert torch.equal(moved["collated_global_crops"], torch.stack(a["global_crops"]))
    assert torch.equal(moved["collated_local_crops"], torch.stack(a["local_crops"]))
    assert moved["labels"].dtype == torch.long


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_other_image_modes_get_torchvisions_result(mode):
    image = photo().convert(mode)
    grey = 0.5 if mode == "L" else 0.0  # torchvision's RandomGrayscale refuses 4 channels
    ours = ColourDistortion((0.4, 0.4, 0.2, 0.1), 1.0, grey)
    ref = T.Compose([T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=1.0), T.RandomGrayscale(p=grey)])
    for seed in range(10):
        torch.manual_seed(seed)
        a = ours(image)
        torch.manual_seed(seed)
        b = ref(image)
        assert a.mode == b.mode and np.array_equal(np.asarray(a), np.asarray(b))
