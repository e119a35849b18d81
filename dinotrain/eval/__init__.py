"""Evaluation of backbones: feature extraction and weighted k-NN."""
