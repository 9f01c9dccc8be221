"""Reshardable AR checkpoints on Megatron ``dist_checkpointing``, committed by a marker written last.

Layout under the run's checkpoint root::

    step_00001000/            one checkpoint
        (dist_checkpointing files: metadata.json, common.pt, *.distcp)
        train_state.json      step, consumed samples, data-loader state, logger run id, layout
        COMMITTED             written last, by rank 0, after every rank finished writing
    latest is found by the markers, never by modification times.

Design decision: on CUDA the stock ``torch_dist`` strategy is used. On CPU it cannot be: its writer
pre-loads tensors with ``non_blocking=True`` and then calls ``torch.cuda.synchronize()``, and its
worker processes re-import the launching script. :class:`SyncTorchDistSaveStrategy` writes the same
``torch_dist`` format with PyTorch's synchronous ``FileSystemWriter`` and Megatron's own planner, so
checkpoints from CPU and GPU runs are interchangeable and load through the same code.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
from torch.distributed import checkpoint as torch_dcp

from videoar_common.atomic import (atomic_write_json, is_committed, latest_committed,
                                   save_committed_step)
from videoar_common.distributed import DistContext

TRAIN_STATE_FILE = "train_state.json"
CHECKPOINT_DIR = "checkpoints"
"""Where a run directory keeps its step_XXXXXXXX checkpoints."""
FORMAT_VERSION = 1
"""``format_version`` of the train_state.json this code writes, and the newest it reads."""


class SyncTorchDistSaveStrategy(SaveShardedStrategy):
    """``torch_dist`` format written synchronously (works on CPU/gloo as well as on CUDA)."""

    def __init__(self):
        super().__init__("torch_dist", 1)

    def save(self, sharded_state_dict, checkpoint_dir):
        sharded, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, True)
        pyt_state_dict = mcore_to_pyt_state_dict(sharded, False)
        writer = torch_dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1)
        torch_dcp.save(pyt_state_dict, storage_writer=writer,
                       planner=MCoreSavePlanner(dedup_replicated_tensors=False, flatten_state_dict=False))

    def can_handle_sharded_objects(self) -> bool:
        return True


def save_strategy(device: torch.device):
    return None if device.type == "cuda" else SyncTorchDistSaveStrategy()


def save_checkpoint(root: str | Path, step: int, sharded_state_dict: dict, train_state: dict,
                    ctx: DistContext, keep_last: int = 0, before_commit=None) -> Path:
    """Save a sharded state dict plus ``train_state`` (rank 0's JSON) and commit it (the protocol of
    :func:`videoar_common.atomic.save_committed_step`, shared with the tokenizer trainer).

    ``before_commit(path)`` runs on every rank after everything is written and before the marker
    (fault injection: a crash there must leave the previous checkpoint in use)."""
    def write(path: Path) -> None:
        dist_checkpointing.save(sharded_state_dict, str(path), sharded_strategy=save_strategy(ctx.device))
        if ctx.is_main:
            atomic_write_json(path / TRAIN_STATE_FILE, train_state)

    return save_committed_step(root, step, ctx, write, keep_last=keep_last, before_commit=before_commit)


def load_checkpoint(path: str | Path, sharded_state_dict: dict) -> tuple[dict, dict]:
    """Load into the layout described by ``sharded_state_dict``; returns (state dict, train_state)."""
    path = Path(path)
    if not is_committed(path):
        raise RuntimeError(f"{path} is not a committed checkpoint (no COMMITTED marker)")
    train_state = read_train_state(path)
    return dist_checkpointing.load(sharded_state_dict, str(path)), train_state


def read_train_state(path: str | Path) -> dict:
    """``train_state.json`` of a step directory; ValueError if a newer format wrote it."""
    state = json.loads((Path(path) / TRAIN_STATE_FILE).read_text())
    version = state.get("format_version", FORMAT_VERSION)
    if version > FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format_version {version}; this videoar-megatron reads format "
                         f"{FORMAT_VERSION} and older: upgrade it")
    return state


def find_resume_checkpoint(root: str | Path) -> Path | None:
    """The newest committed checkpoint under ``root`` (uncommitted directories are ignored)."""
    return latest_committed(root)


def find_newest_checkpoint(path: str | Path) -> Path | None:
    """The newest committed step under ``path`` (a checkpoint root) or under ``path/checkpoints`` (a run
    directory): what ``--load``, ``sample --ckpt`` and ``eval fvd --checkpoint`` accept besides a step."""
    return find_resume_checkpoint(path) or find_resume_checkpoint(Path(path) / CHECKPOINT_DIR)


MODEL_KEY = "model"
OPTIMIZER_KEY = "optimizer"


def model_sharded_state_dict(model, ctx: DistContext) -> dict:
    """The model's Megatron sharded state dict under the checkpoint's ``model.`` prefix."""
    from megatron.core import parallel_state
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    return model.sharded_state_dict(prefix=f"{MODEL_KEY}.", metadata=metadata)


def load_model_weights(path: str | Path, model, ctx: DistContext) -> dict:
    """Load only the model weights of a committed checkpoint into ``model`` (any TP/PP layout);
    returns the checkpoint's train_state (which holds the resolved config)."""
    state, train_state = load_checkpoint(path, model_sharded_state_dict(model, ctx))
    apply_model_state(model, state, path)
    return train_state


def apply_model_state(model, state: dict, path: str | Path = "checkpoint") -> None:
    """Copy the ``model.``-prefixed entries of a loaded state dict into ``model`` (strict)."""
    model_state = {k: v for k, v in state.items() if k.startswith(f"{MODEL_KEY}.")}
    missing, unexpected = model.load_state_dict(_strip_prefix(model_state, f"{MODEL_KEY}."), strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
