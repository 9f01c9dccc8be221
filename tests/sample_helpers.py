"""Shared by the sampler tests and their torchrun scripts: a tiny tokenizer, a tiny VideoAR model, a real
tiny training run's checkpoints (``train_tiny_run``: what sampling and evaluation load), and hand-made
checkpoints in the trainer's contract for what the trainer cannot make (text-token conditioning)."""
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


TRAINED_STEPS = (1, 2)
"""Committed checkpoints of :func:`train_tiny_run` (it saves after every step)."""


def train_tiny_run(root: Path) -> Path:
    """The pipeline at sampling-test size, through the production code: this module's tokenizer
    (``root/tokenizer``), 5 synthetic VP9 videos (one per class), the pre-tokenizer (two 9-frame 64x64
    clips a video, schedule SCALES) and ``videoar train`` on the tiny recipe with :func:`model_config`'s
    condition and 2 query groups (so TP=2 sampling meets GQA), for 2 steps, saving after each. Returns
    the run directory (checkpoints/step_00000001, step_00000002 with the train_state the trainer wrote)."""
    from data_prep.synth import make_corpus
    from tests.pretok_helpers import pretok_config, pretokenizer
    from tests.train_helpers import run_train
    tokenizer = root / "tokenizer"
    write_tokenizer(tokenizer)
    corpus = make_corpus(root / "corpus", num=NUM_CLASSES, classes=NUM_CLASSES, codec="vp9", frames=12, size=(64, 64),
                         fps=8, seed=0)
    schedule = [list(s) for s in SCALES]
    clips = {"num_frames": 1 + 4 * (LATENT_FRAMES - 1), "height": 64, "width": 64, "clips_per_video": 2}
    pretokenizer(pretok_config(tokenizer, corpus, root / "shards", clips=clips, scale_schedule=schedule,
                               num_partitions=1)).run()
    cond = model_config().condition
    run_train(1, root / "run", root / "shards", "data.num_frames=9", "data.resolution=[64, 64]",
              f"data.scale_schedule={schedule}", f"model.latent_dim={D}", "model.num_query_groups=2",
              f"model.condition.num_classes={cond.num_classes}",
              f"model.condition.tokens_per_class={cond.tokens_per_class}",
              f"train.steps={TRAINED_STEPS[-1]}", "train.global_batch_size=4", "train.micro_batch_size=2",
              "optim.warmup_steps=1", "checkpoint.save_every=1", "checkpoint.keep_last=0")
    return root / "run"


def write_ar_checkpoint(root: Path, step: int, cfg: ModelConfig, tokenizer_hash: str, ctx, groups,
                        seed: int = 0, latent_frames: int = LATENT_FRAMES) -> Path:
    """A committed AR checkpoint in the trainer's format (weights + train_state.json), for models the
    trainer cannot train (``condition.kind=text_tokens``); everything else loads :func:`train_tiny_run`'s."""
    model = make_model(cfg, groups, seed)
    train_state = {"step": step, "model_config": config_to_dict(cfg), "scale_schedule": [list(s) for s in SCALES],
                   "latent_frames": latent_frames, "tokenizer_hash": tokenizer_hash, "consumed_samples": 0}
    return save_checkpoint(root, step, model_sharded_state_dict(model, ctx), train_state, ctx)
