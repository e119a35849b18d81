"""Data pipeline: image folders, the built-in tiny dataset, DINOv2 augmentations, iBOT masks,
collation, the resumable sharded sampler, seeds, and the training loader (`dinotrain.data.loader`)."""

from dinotrain.data.augmentations import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentationDINO,
    make_eval_transform,
)
from dinotrain.data.datasets import IMAGE_EXTENSIONS, ImageFolderDataset
from dinotrain.data.masking import MaskingGenerator
from dinotrain.data.samplers import InfiniteShardedSampler
from dinotrain.data.tiny import default_tiny_root, ensure_tiny_dataset, make_tiny_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataAugmentationDINO",
    "ImageFolderDataset",
    "InfiniteShardedSampler",
    "MaskingGenerator",
    "default_tiny_root",
    "ensure_tiny_dataset",
    "make_eval_transform",
    "make_tiny_dataset",
]
