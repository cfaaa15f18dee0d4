"""m2pt_kernels: fused GPU kernels for the Multimodal Pathway method (M2PT, CVPR 2024)."""
from setuptools import find_packages, setup

TEST_EXTRAS = [
    "pytest>=7",
    "pytest-benchmark>=4",
    "numpy",
    "safetensors",
    "timm",
    "transformers",
    "scikit-learn",
    "matplotlib",
    "tqdm",
]
DEMO_EXTRAS = ["scikit-learn", "matplotlib", "tqdm", "safetensors"]

setup(
    name="m2pt_kernels",
    version="0.1.0",
    description="Fused Triton/CUDA kernels and tools for Multimodal Pathway (M2PT) cross-modal re-parameterization",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["m2pt_kernels", "m2pt_kernels.*"]),
    install_requires=["torch>=2.5"],
    extras_require={
        "triton": ["triton"],
        "demo": DEMO_EXTRAS,
        "test": TEST_EXTRAS,
        "bench": ["pytest-benchmark>=4", "matplotlib", "numpy"],
    },
    entry_points={"console_scripts": ["m2pt = m2pt_kernels.cli:main"]},
)
