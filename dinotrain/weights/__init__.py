"""Every weights format in and out, and one resolver for "what does this path hold".

- `resolve.py`: `open_weights(path, which=None)` -> `Weights` for any path a user can give (run and checkpoint
  directories, full exports, hub `.pth`, safetensors, Hugging Face directories); every reader calls it.
- `state_dict.py`: backbone state dicts (prefixes, the architecture they imply, safe reading, position-grid fitting).
- `convert.py`: the hub / safetensors / hf formats out, and a backbone built from any weights.
- `hf.py`: Hugging Face `transformers` directories <-> official names. `full.py`: backbone + heads + config in one
  file. `checkpoint.py`: a backbone (and heads) read from a sharded checkpoint.
"""

from dinotrain.weights.convert import (FORMATS, backbone_from_weights, convert, load_backbone, save_backbone,
                                       write_weights)
from dinotrain.weights.hf import hf_config, load_hf, save_hf
from dinotrain.weights.resolve import open_weights, read_weights, resolve
from dinotrain.weights.state_dict import Weights, WeightsError

__all__ = [
    "FORMATS", "Weights", "WeightsError", "backbone_from_weights", "convert", "hf_config", "load_backbone", "load_hf",
    "open_weights", "read_weights", "resolve", "save_backbone", "save_hf", "write_weights",
]
