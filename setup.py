"""Package metadata for dinotrain."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="dinotrain",
    version="0.1.0",
    description="DINOv2-style self-supervised pretraining and distillation of Vision Transformers, CPU to SLURM",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["dinotrain", "dinotrain.*"]) + ["dinotrain.configs"],
    package_dir={"dinotrain.configs": "configs"},
    package_data={"dinotrain.configs": ["*.yaml", "*/*.yaml"]},
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "omegaconf>=2.3",
        "pyyaml",  # cluster profiles (slurm/*.yaml)
        "submitit>=1.5",
        "safetensors",
        "numpy",
        "pillow",
        "opencv-python-headless",  # hue shift and Gaussian blur of the training crops (dinotrain/data/photometric.py)
        "scikit-learn",  # ships the digits that the built-in tiny dataset is rendered from
        "tqdm",  # progress bar of dinotrain embed
        "matplotlib",  # dinotrain visualize and plot
        "fastapi",  # dinotrain serve (ASGI app, request models, OpenAPI page)
        "uvicorn",  # dinotrain serve (the ASGI server)
        "prometheus_client",  # dinotrain serve: /metrics
    ],
    extras_require={
        # pytest-xdist: the suite on every core (pytest.ini); transformers' DINOv3ViTModel (4.56+) and timm's dinov3 Eva: the DINOv3 parity references (tests/models)
        # onnx + onnxruntime: the ONNX export and its parity tests (tests/weights/test_onnx_export.py)
        # pytest-timeout: a test that hangs fails with its stack after `timeout` s (pytest.ini) instead of holding CI
        "test": ["pytest>=8", "pytest-xdist>=3.6", "pytest-timeout>=2.3", "transformers>=4.56", "timm>=1.0.31", "onnx>=1.16",
                 "onnxruntime>=1.17"],
        # dinotrain export --to onnx, --runtime onnx / --precision int8 of embed, eval and serve
        "onnx": ["onnx>=1.16", "onnxruntime>=1.17"],
        "xformers": ["xformers"],
        "students": ["timm>=1.0.31"],  # distillation students of other architectures (student.arch: timm/<name>)
    },
    entry_points={"console_scripts": ["dinotrain=dinotrain.cli:main"]},
)
