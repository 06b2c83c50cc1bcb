"""megatron_oapl packaging.

install_requires carries lower bounds only: clusters run NGC containers with newer torch /
megatron-core / Python. The tested CPU versions are pinned in the `cpu` extra, which is what the
README's CPU commands and CI install (torch 2.13.0 CPU from the local wheel; never a CUDA build).
GPU-only pieces are the `gpu` extra and are imported lazily. NVIDIA apex is an optional import only:
the PyPI package named `apex` is unrelated and must never be installed.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_oapl",
    version="0.1.0",
    description="OAPL RL post-training with Megatron-Core learners and a lagged vLLM fleet",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_oapl", "megatron_oapl.*"]),
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "pyyaml>=6",
        "psutil",  # Megatron's checkpoint saver starts a multiprocessing Manager that needs it
        "tensorboard>=2.14",
        "tqdm",
    ],
    extras_require={
        # The exact versions CI tests on a CPU-only Python 3.11 machine.
        "cpu": ["torch==2.13.0", "megatron-core==0.16.1"],
        "gpu": ["transformer-engine[pytorch]>=2.9", "vllm>=0.11"],
        "dev": ["pytest>=8", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["oapl=megatron_oapl.cli:main"]},
)
