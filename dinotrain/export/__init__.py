"""Weight formats: official hub `.pth`, safetensors with a recorded spec, and `transformers` directories."""

from dinotrain.export.convert import FORMATS, convert, load_backbone, read_weights, save_backbone, write_weights
from dinotrain.export.hf import hf_config, load_hf, save_hf

__all__ = [
    "FORMATS", "convert", "hf_config", "load_backbone", "load_hf", "read_weights", "save_backbone", "save_hf",
    "write_weights",
]
