"""Every weights format in and out, and one resolver for "what does this path hold".

- `resolve.py`: `open_weights(path, which=None)` -> `Weights` for any path a user can give (run and checkpoint
  directories, full exports, hub `.pth`, safetensors, Hugging Face directories, timm dinov3 weights; DINOv2 / DINO
  v1 and DINOv3 backbones); every reader calls it.
- `state_dict.py`: backbone state dicts (prefixes, the architecture they imply, safe reading, position-grid fitting).
- `convert.py`: the hub / safetensors / hf formats out, and a backbone built from any weights.
- `hf.py`: Hugging Face `transformers` directories <-> official names. `full.py`: backbone + heads + config in one
  file. `checkpoint.py`: a backbone (and heads) read from a sharded checkpoint.
- `dinov3_layouts.py` (pure renaming) and `dinov3_files.py` (files): DINOv3 backbones in the official `.pth`,
  transformers `DINOv3ViTModel` and timm dinov3 layouts.
- `backbone.py`: the backbone of `--weights PATH` or `--model NAME`. `export.py`: `dinotrain export`.
"""

# Nothing is imported here: modules below `distributed/` and `models/` import `weights.state_dict`, and a package
# that imported its modules would close import cycles through them (tests/test_imports.py).
