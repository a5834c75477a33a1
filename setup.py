from setuptools import find_packages, setup

setup(
    name="semiseg-bench",
    version="0.1.0",
    description="Benchmark suite for semi-supervised semantic segmentation on PyTorch Lightning",
    packages=find_packages(include=["src", "src.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1,<=2.14.1",
        "torchvision<=0.29.1",
        "pytorch-lightning>=2.4,<2.7",
        "segmentation-models-pytorch==0.6.0",
        "albumentations>=2.0,<2.1",
        "torchmetrics>=1.4",
        "pandas>=2.0",
        "tensorboard>=2.14",
        "jsonargparse[signatures]>=4.32",
        "matplotlib>=3.7",
        "scipy>=1.10",  # the class-relation figure's clustering; albumentations needs it too
        "pillow>=10",
        "numpy>=1.24",
    ],
    extras_require={"dev": ["pytest>=8"]},
)
