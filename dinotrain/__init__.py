"""dinotrain: DINOv2-style self-supervised pretraining and distillation of Vision Transformers."""

__version__ = "0.1.0"
