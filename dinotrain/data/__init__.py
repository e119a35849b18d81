"""Data pipeline: image folders, the built-in tiny dataset, DINOv2 augmentations, iBOT masks,
collation and the resumable sharded sampler."""

from dinotrain.data.augmentations import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataAugmentationDINO,
    make_eval_transform,
)
from dinotrain.data.collate import DataCollator, collate_data_and_cast, draw_masks
from dinotrain.data.datasets import IMAGE_EXTENSIONS, ImageFolderDataset
from dinotrain.data.masking import MaskingGenerator
from dinotrain.data.samplers import InfiniteShardedSampler
from dinotrain.data.tiny import default_tiny_root, ensure_tiny_dataset, make_tiny_dataset

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "IMAGE_EXTENSIONS",
    "DataAugmentationDINO",
    "DataCollator",
    "ImageFolderDataset",
    "InfiniteShardedSampler",
    "MaskingGenerator",
    "collate_data_and_cast",
    "default_tiny_root",
    "draw_masks",
    "ensure_tiny_dataset",
    "make_eval_transform",
    "make_tiny_dataset",
]
