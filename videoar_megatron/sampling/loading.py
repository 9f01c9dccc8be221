"""A sampler from an AR checkpoint and a tokenizer directory, with the checks between them.

AR checkpoint contract (written by the trainer): a committed ``step_XXXXXXXX`` directory with Megatron
``dist_checkpointing`` model weights under the prefix ``model.`` and ``train_state.json`` holding at
least ``step``, ``model_config`` (a resolved :class:`ModelConfig` as a dict), ``scale_schedule``
(``[[h, w], ...]``), ``latent_frames`` (the window the model was trained on) and ``tokenizer_hash``.
``--ckpt`` may name a step directory or a run's checkpoint root (then its newest committed step).

The tokenizer must be the one the shards were made with: its content hash must equal the
checkpoint's ``tokenizer_hash`` (an error names both). The weights are loaded at the sampling TP
size whatever the training layout was (``dist_checkpointing`` reshards).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from tokenizer import load_tokenizer
from tokenizer.checkpoint import TokenizerCheckpointError
from tokenizer.model import VideoTokenizer
from videoar_common.atomic import is_committed
from videoar_common.config import ConfigError, build_dataclass
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import InputError
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.model import build_model
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.sampler import VideoARSampler
from videoar_megatron.training.dist_ckpt import (CHECKPOINT_DIR, TRAIN_STATE_FILE, find_newest_checkpoint,
                                                 load_model_weights, read_train_state)

REQUIRED_STATE = ("step", "model_config", "scale_schedule", "latent_frames", "tokenizer_hash")


class SamplerLoadError(InputError, RuntimeError):
    """The checkpoint or tokenizer cannot be used for sampling; the message names the file or field."""


@dataclass
class CheckpointInfo:
    path: Path
    """The committed step directory."""
    step: int
    model_cfg: ModelConfig
    scales: list[tuple[int, int]]
    latent_frames: int
    tokenizer_hash: str


def resolve_checkpoint(path: str | Path) -> Path:
    """A committed step directory: ``path`` itself, the newest committed step under it, or under
    ``path/checkpoints`` (a run directory of ``videoar train``, as ``--load`` accepts)."""
    path = Path(path)
    if not path.is_dir():
        raise SamplerLoadError(f"checkpoint not found: {path}")
    if (path / TRAIN_STATE_FILE).is_file():
        if not is_committed(path):
            raise SamplerLoadError(f"{path} has no COMMITTED marker: the save did not finish")
        return path
    latest = find_newest_checkpoint(path)
    if latest is None:
        raise SamplerLoadError(f"{path}: neither a checkpoint step directory ({TRAIN_STATE_FILE}), nor a directory "
                               f"holding a committed step_XXXXXXXX directory, nor a run directory whose "
                               f"{CHECKPOINT_DIR}/ holds one")
    return latest


def read_checkpoint_info(step_dir: Path) -> CheckpointInfo:
    state_file = step_dir / TRAIN_STATE_FILE
    try:
        state = read_train_state(step_dir)
    except ValueError as e:
        raise SamplerLoadError(str(e)) from e
    missing = [k for k in REQUIRED_STATE if k not in state]
    if missing:
        raise SamplerLoadError(f"{state_file} lacks {missing}: not an AR checkpoint the sampler can read")
    try:
        model_cfg = build_dataclass(ModelConfig, state["model_config"])
    except ConfigError as e:
        raise SamplerLoadError(f"{state_file}: model_config: {e}") from e
    scales = [(int(h), int(w)) for h, w in state["scale_schedule"]]
    return CheckpointInfo(path=step_dir, step=int(state["step"]), model_cfg=model_cfg, scales=scales,
                          latent_frames=int(state["latent_frames"]), tokenizer_hash=str(state["tokenizer_hash"]))


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def check_tokenizer(tokenizer: VideoTokenizer, info: CheckpointInfo, tokenizer_dir: str | Path) -> None:
    if tokenizer.content_hash != info.tokenizer_hash:
        raise SamplerLoadError(
            f"tokenizer mismatch: {tokenizer_dir} has content hash {tokenizer.content_hash} but the checkpoint "
            f"{info.path} was trained on tokens of tokenizer {info.tokenizer_hash} (train_state.json "
            "tokenizer_hash); pass the tokenizer the shards were made with")
    if tokenizer.cfg.latent_dim != info.model_cfg.latent_dim:
        raise SamplerLoadError(f"tokenizer latent_dim {tokenizer.cfg.latent_dim} != model_config.latent_dim "
                               f"{info.model_cfg.latent_dim}")


@dataclass
class LoadedSampler:
    """A sampler, its tokenizer and where they came from."""

    sampler: VideoARSampler
    tokenizer: VideoTokenizer
    info: CheckpointInfo
    tokenizer_dir: Path
    ctx: DistContext
    groups: object

    @property
    def resolution(self) -> tuple[int, int]:
        f = self.tokenizer.cfg.spatial_factor
        H, W = self.sampler.latent_hw
        return H * f, W * f

    @property
    def window_pixel_frames(self) -> int:
        return 1 + self.tokenizer.cfg.temporal_factor * (self.info.latent_frames - 1)

    def close(self) -> None:
        destroy_model_parallel(self.ctx)


def load_sampler(checkpoint: str | Path, tokenizer_dir: str | Path, cfg: SamplingConfig,
                 ctx: DistContext) -> LoadedSampler:
    """Tokenizer (hash-checked), model at ``cfg.tensor_parallel`` with the checkpoint's weights, sampler."""
    info = read_checkpoint_info(resolve_checkpoint(checkpoint))
    dtype = resolve_dtype(cfg.dtype, ctx.device)
    try:
        tokenizer = load_tokenizer(tokenizer_dir, device=ctx.device, dtype=dtype)
    except TokenizerCheckpointError as e:
        raise SamplerLoadError(str(e)) from e
    check_tokenizer(tokenizer, info, tokenizer_dir)
    quantizer = tokenizer.quantizer_for(info.scales)
    if ctx.world_size % cfg.tensor_parallel:
        raise SamplerLoadError(f"world size {ctx.world_size} is not divisible by tensor_parallel={cfg.tensor_parallel}")
    parallel = ParallelConfig(tensor_parallel=cfg.tensor_parallel)
    groups = init_model_parallel(ctx, parallel)
    model = build_model(info.model_cfg, parallel, groups, device=ctx.device, params_dtype=dtype)
    load_model_weights(info.path, model, ctx)
    sampler = VideoARSampler(model, quantizer, info.model_cfg, cfg, window_frames=info.latent_frames,
                             tp_group=groups.tp)
    return LoadedSampler(sampler=sampler, tokenizer=tokenizer, info=info, tokenizer_dir=Path(tokenizer_dir),
                         ctx=ctx, groups=groups)
