"""Shared by the sampler tests and their torchrun scripts: a tiny tokenizer, a tiny VideoAR model, and
AR checkpoints in the trainer's contract (random weights) written the way the trainer writes them."""
from __future__ import annotations

from pathlib import Path

import torch

from tokenizer.checkpoint import save_tokenizer
from tokenizer.config import TokenizerModelConfig
from tokenizer.model import VideoTokenizer
from videoar_common.config import build_dataclass, config_to_dict
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.model import build_model
from videoar_megatron.training.dist_ckpt import model_sharded_state_dict, save_checkpoint

D = 8
SCALES = [(1, 1), (2, 2), (4, 4)]
"""AR scale schedule over the tiny tokenizer's 4x4 latent grid (64x64 pixels)."""
LATENT_FRAMES = 3
"""Window of the test checkpoints: 3 latent frames = 9 pixel frames."""
NUM_CLASSES = 5


def tokenizer_config() -> TokenizerModelConfig:
    return TokenizerModelConfig(base_channels=8, channel_mult=[1, 1, 2, 2, 2], norm_groups=4, latent_dim=D,
                                scale_schedule=[list(s) for s in SCALES])


def make_tokenizer(seed: int = 0) -> VideoTokenizer:
    torch.manual_seed(seed)
    return VideoTokenizer(tokenizer_config()).eval()


def write_tokenizer(directory: Path, seed: int = 0) -> str:
    return save_tokenizer(make_tokenizer(seed), directory)


def model_config(**over) -> ModelConfig:
    raw = {"size": "tiny", "latent_dim": D,
           "condition": {"kind": "class", "num_classes": NUM_CLASSES, "tokens_per_class": 2}}
    raw.update(over)
    return build_dataclass(ModelConfig, raw)


def make_model(cfg: ModelConfig, groups, seed: int = 0):
    """TP=1 model with random weights large enough that the logits are far from uniform."""
    torch.manual_seed(seed)
    model = build_model(cfg, ParallelConfig(), groups)
    with torch.no_grad():
        model.head.weight.mul_(20.0)   # sharper bit probabilities: sampling has something to decide
    return model.eval()


def write_ar_checkpoint(root: Path, step: int, cfg: ModelConfig, tokenizer_hash: str, ctx, groups,
                        seed: int = 0, latent_frames: int = LATENT_FRAMES) -> Path:
    """A committed AR checkpoint exactly as the trainer writes it (weights + train_state.json)."""
    model = make_model(cfg, groups, seed)
    train_state = {"step": step, "model_config": config_to_dict(cfg), "scale_schedule": [list(s) for s in SCALES],
                   "latent_frames": latent_frames, "tokenizer_hash": tokenizer_hash, "consumed_samples": 0}
    return save_checkpoint(root, step, model_sharded_state_dict(model, ctx), train_state, ctx)
