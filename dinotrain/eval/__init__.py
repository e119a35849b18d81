"""Evaluation of backbones: feature extraction, weighted k-NN, linear probes; `run.py`: the `dinotrain eval` flows."""
