"""DataAugmentationDINO and the evaluation transform."""

import pickle

import pytest
import torch
from PIL import Image

from dinotrain.data import IMAGENET_MEAN, IMAGENET_STD, DataAugmentationDINO, make_eval_transform
from dinotrain.data.augmentations import OFFICIAL_CODE_BLUR_PROBABILITIES, PAPER_BLUR_PROBABILITIES, blur_kernel_for
from dinotrain.data.photometric import RandomSolarize


def _image(size=(64, 48)):
    gradient = torch.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3)
    return Image.fromarray(gradient.to(torch.uint8).numpy())


def test_output_keys_shapes_and_counts():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 3, global_crops_size=32, local_crops_size=16)
    out = augment(_image())
    assert set(out) == {"global_crops", "global_crops_teacher", "local_crops", "offsets"}
    assert len(out["global_crops"]) == 2 and len(out["local_crops"]) == 3 and out["offsets"] == ()
    assert all(c.shape == (3, 32, 32) and c.dtype == torch.float32 for c in out["global_crops"])
    assert all(c.shape == (3, 16, 16) for c in out["local_crops"])
    assert all(a is b for a, b in zip(out["global_crops"], out["global_crops_teacher"]))
    assert not torch.equal(out["global_crops"][0], out["global_crops"][1])


def test_zero_local_crops_gives_empty_list():
    out = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 0, global_crops_size=16)(_image())
    assert out["local_crops"] == [] and len(out["global_crops"]) == 2


def test_tiny_image_is_upsampled_to_crop_size():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=32, local_crops_size=16)
    out = augment(_image((20, 20)))
    assert out["global_crops"][0].shape == (3, 32, 32) and out["local_crops"][1].shape == (3, 16, 16)


def test_official_recipe_structure():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 8)
    crop = augment.geometric_global
    assert crop.size == 224 and crop.scale == (0.32, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert crop.flip_probability == 0.5 and augment.geometric_local.size == 96
    colour, blur1, normalize = augment.global_transform_1.transforms
    jitter = colour.jitter
    assert colour.jitter_probability == 0.8 and colour.grayscale_probability == 0.2
    ranges = (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue)
    assert ranges == ((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))
    assert blur1.p == 1.0 and blur1.kernel_size == 9 and blur1.sigma == (0.1, 2.0)
    _, blur2, solarize, _ = augment.global_transform_2.transforms
    assert blur2.p == 0.1 and solarize.p == 0.2 and solarize.threshold == 128
    assert augment.local_transform.transforms[1].p == 0.5
    assert normalize.mean == IMAGENET_MEAN and normalize.std == IMAGENET_STD


def test_blur_kernel_is_clipped_to_odd_size_within_crop():
    assert blur_kernel_for(224) == 9 and blur_kernel_for(8) == 7 and blur_kernel_for(5) == 5
    assert blur_kernel_for(32, 3) == 3 and blur_kernel_for(2) == 1
    augment = DataAugmentationDINO((0.5, 1.0), (0.2, 0.5), 1, global_crops_size=6, local_crops_size=4)
    assert augment.global_transform_1.transforms[1].kernel_size == 5
    assert augment.local_transform.transforms[1].kernel_size == 3
    augment(_image((10, 10)))  # runs with the clipped kernels


def test_deterministic_under_torch_seed_and_picklable():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=16, local_crops_size=8)
    torch.manual_seed(3)
    first = augment(_image())
    torch.manual_seed(3)
    second = pickle.loads(pickle.dumps(augment))(_image())
    assert all(torch.equal(a, b) for a, b in zip(first["local_crops"], second["local_crops"]))


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"global_crops_scale": (0.0, 1.0)}, "global_crops_scale"),
        ({"global_crops_scale": (0.6, 0.4)}, "global_crops_scale"),
        ({"local_crops_scale": (0.05, 1.2)}, "local_crops_scale"),
        ({"local_crops_scale": 0.3}, "local_crops_scale"),
        ({"local_crops_scale": (0.1, 0.2, 0.3)}, "local_crops_scale"),
        ({"local_crops_number": -1}, "local_crops_number"),
        ({"global_crops_size": 0}, "global_crops_size"),
        ({"local_crops_size": 9.5}, "local_crops_size"),
        ({"blur_kernel_size": 4}, "blur_kernel_size"),
        ({"color_jitter": (0.4, 0.4, 0.2)}, "color_jitter"),
        ({"color_jitter": (0.4, -0.1, 0.2, 0.1)}, "color_jitter"),
        ({"color_jitter": (0.4, 0.4, 0.2, 0.6)}, "color_jitter"),
        ({"color_jitter_probability": 1.5}, "color_jitter_probability"),
        ({"grayscale_probability": -0.1}, "grayscale_probability"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, name):
    args = {"global_crops_scale": (0.32, 1.0), "local_crops_scale": (0.05, 0.32), "local_crops_number": 2}
    with pytest.raises(ValueError, match=name):
        DataAugmentationDINO(**{**args, **kwargs})


def test_scale_accepts_lists_from_configs():
    augment = DataAugmentationDINO([0.32, 1.0], [0.05, 0.32], 1, global_crops_size=16, local_crops_size=8)
    assert augment.global_crops_scale == (0.32, 1.0)


def test_eval_transform_resizes_crops_and_normalises():
    out = make_eval_transform(40, 32)(_image((80, 50)))
    assert out.shape == (3, 32, 32)
    white = make_eval_transform(8, 8, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))(Image.new("RGB", (9, 9), "white"))
    assert torch.allclose(white, torch.ones_like(white), atol=1e-2)
    with pytest.raises(ValueError, match="crop_size"):
        make_eval_transform(32, 0)


class _BlurSpy:
    """Stands in for a view's blurring step: counts how often the random draw lets it run, then blurs."""

    def __init__(self, blur):
        self.blur, self.calls = blur, 0

    def __call__(self, img, sigma):
        self.calls += 1
        return self.blur(img, sigma)


@pytest.mark.parametrize("probabilities", [PAPER_BLUR_PROBABILITIES, OFFICIAL_CODE_BLUR_PROBABILITIES])
def test_blur_frequency_of_each_view_matches_configured_probability(probabilities):
    n_images, n_local = 500, 2
    augment = DataAugmentationDINO((0.5, 1.0), (0.2, 0.5), n_local, global_crops_size=16, local_crops_size=8,
                                   blur_probabilities=probabilities)
    blurs = [augment.global_transform_1.transforms[1], augment.global_transform_2.transforms[1],
             augment.local_transform.transforms[1]]
    spies = []
    for blur in blurs:
        spies.append(_BlurSpy(blur.blur))
        blur.blur = spies[-1]
    torch.manual_seed(0)
    image = _image((24, 24))
    for _ in range(n_images):
        augment(image)
    for spy, draws, p in zip(spies, (n_images, n_images, n_images * n_local), probabilities):
        sigma = (p * (1 - p) / draws) ** 0.5
        assert abs(spy.calls / draws - p) <= 4 * sigma + 1e-12, (spy.calls, draws, p)  # exact for p = 0 or 1


def test_solarize_only_on_global_view_2():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, blur_probabilities=OFFICIAL_CODE_BLUR_PROBABILITIES)

    def solarizers(pipeline):
        return [t for t in pipeline.transforms if isinstance(t, RandomSolarize)]

    assert solarizers(augment.global_transform_1) == [] and solarizers(augment.local_transform) == []
    (solarize,) = solarizers(augment.global_transform_2)
    assert solarize.p == 0.2 and solarize.threshold == 128


@pytest.mark.parametrize("bad", [(1.1, 0.1, 0.5), (0.5, -0.1, 0.5), (0.5, 0.5), (0.1, 0.2, 0.3, 0.4), "abc", 0.5,
                                 (float("nan"), 0.1, 0.5)])
def test_bad_blur_probabilities_raise(bad):
    with pytest.raises(ValueError, match="blur_probabilities"):
        DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, blur_probabilities=bad)


def test_recipes_choose_blur_probabilities_and_config_validates_them(monkeypatch):
    from dinotrain.config import ConfigError, load_config
    from dinotrain.data import loader

    data = ["train.dataset_path=/data/imagenet/train"]
    assert list(load_config().crops.blur_probabilities) == list(PAPER_BLUR_PROBABILITIES)
    assert list(load_config("smoke/cpu_tiny").crops.blur_probabilities) == list(PAPER_BLUR_PROBABILITIES)
    for recipe in ("train/vitl14", "train/vitg14"):
        assert list(load_config(recipe, data).crops.blur_probabilities) == list(OFFICIAL_CODE_BLUR_PROBABILITIES)
    for bad in ("[1.5,0.1,0.5]", "[0.0,-0.2,0.5]", "[0.1,0.5]"):
        with pytest.raises(ConfigError, match="crops.blur_probabilities"):
            load_config(None, [f"crops.blur_probabilities={bad}"])
    # the training dataset's augmentation receives the configured values
    monkeypatch.setattr(loader, "ImageFolderDataset", lambda root, transform, index_cache_dir=None: transform)
    augment = loader.build_train_dataset(load_config("train/vitl14", data))
    assert augment.blur_probabilities == OFFICIAL_CODE_BLUR_PROBABILITIES
    assert augment.global_transform_1.transforms[1].p == 0.0 and augment.global_transform_2.transforms[1].p == 0.9


def test_colour_settings_reach_every_view_and_grayscale_one_makes_every_crop_grey():
    augment = DataAugmentationDINO((0.32, 1.0), (0.05, 0.32), 2, global_crops_size=16, local_crops_size=8,
                                   color_jitter=(0.8, 0.8, 0.8, 0.2), color_jitter_probability=1.0,
                                   grayscale_probability=1.0)
    for view in (augment.global_transform_1, augment.global_transform_2, augment.local_transform):
        colour = view.transforms[0]
        jitter = colour.jitter
        assert colour.jitter_probability == 1.0 and colour.grayscale_probability == 1.0
        ranges = [v for r in (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) for v in r]
        assert ranges == pytest.approx([0.2, 1.8, 0.2, 1.8, 0.2, 1.8, -0.2, 0.2])
    rgb = Image.fromarray((torch.rand(24, 24, 3) * 255).to(torch.uint8).numpy())
    out = augment(rgb)
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    for crop in out["global_crops"] + out["local_crops"]:
        pixels = crop * std + mean  # back to [0, 1] RGB: the three channels are equal
        assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[1], pixels[2], atol=1e-5)
