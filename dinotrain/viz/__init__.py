"""Pictures: PCA of patch features and CLS attention maps (features.py), PNG figures and training curves (render.py),
the `dinotrain visualize` pipeline from image files (pictures.py)."""
