"""minitron: structured pruning + knowledge distillation of Hugging Face causal LMs (Minitron method).

On a machine without CUDA install with `-c launch/cpu-constraints.txt` so that pip takes the CPU
build of torch instead of resolving the newest (CUDA) wheel.
"""
from setuptools import find_packages, setup

setup(
    name="minitron",
    version="0.1.0",
    description="Prune and distill Hugging Face LLMs into smaller ones (Minitron), on DeepSpeed.",
    python_requires=">=3.10",
    packages=find_packages(include=["minitron", "minitron.*"]) + ["minitron.conf"],
    # conf/ sits at the top of the repo (it is what users edit) and ships inside the package as
    # minitron.conf, so the entry points find it from any working directory.
    package_dir={"minitron.conf": "conf"},
    package_data={"minitron.conf": ["*.yaml", "*/*.yaml", "*/*/*.yaml"],
                  "minitron.eval.tasks": ["*.yaml", "*.jsonl"]},
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "datasets>=3.0",
        "hydra-core>=1.3",
        "omegaconf>=2.3",
        "wandb>=0.18",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "numpy>=1.26",
        "pyarrow>=15",
        "matplotlib>=3.7",
    ],
    extras_require={
        # triton: its interpreter runs the GPU loss kernel's tests on CPU (TRITON_INTERPRET=1).
        # scipy: the reference Kendall tau; the submitit plugin: the SLURM launcher config composes.
        # lm-eval: the shipped local task runs for real in the tests.
        "dev": ["pytest>=8", "pytest-timeout>=2.3", "triton>=3.2", "scipy>=1.10", "hydra-submitit-launcher>=1.2",
                "lm-eval[hf]>=0.4"],
        "gpu": ["flash-attn>=2.6"],
        # benchmarks/vs_trl.py: TRL's GKD trainer, the peer it is measured against.
        "bench": ["trl>=1.0"],
        "eval": ["lm-eval[hf]>=0.4"],
        # hydra/launcher=slurm: search candidates (or any sweep) as SLURM jobs.
        "slurm": ["hydra-submitit-launcher>=1.2"],
    },
    entry_points={"console_scripts": ["minitron-train=minitron.cli.train:main",
                                        "minitron-prune=minitron.cli.prune:main",
                                        "minitron-distill=minitron.cli.distill:main",
                                        "minitron-search=minitron.cli.search:main",
                                        "minitron-eval=minitron.cli.eval:main",
                                        "minitron-pipeline=minitron.cli.pipeline:main",
                                        "minitron-plan=minitron.cli.plan:main"]},
)
