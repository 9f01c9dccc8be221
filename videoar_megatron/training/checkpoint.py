"""What an AR training checkpoint holds, and how a run resumes from one or starts from weights.

A checkpoint (``<run_dir>/checkpoints/step_XXXXXXXX/``, written by :mod:`.dist_ckpt`, committed by a
marker written last) holds, in Megatron ``dist_checkpointing`` format:

- ``model.*``: the weights (``model_sharded_state_dict``; reshardable over TP/PP);
- ``optimizer.*``: the optimizer state from the optimizer's own ``sharded_state_dict`` (Megatron's
  reshardable formats: per-parameter state for the CPU ``FP32Optimizer``; ``fully_reshardable`` for the
  distributed optimizer), so it loads at another TP/CP/PP/DP layout;
- ``rng_state``: every rank's RNG states (torch, CUDA, Megatron's tracker, numpy, random). They are
  restored when the layout is unchanged; at another layout they cannot be mapped to ranks and are
  re-seeded instead, which changes nothing in training: every random draw of the batches is derived
  from (seed, step, sample id) (see :mod:`.data`), and the model has no dropout;

and ``train_state.json`` (rank 0): step, consumed samples, LR-schedule and numerics-guard state, the
data-loader position, the logger run id, the layout, the model config and the resolved training
config (the AR checkpoint contract the sampler relies on; fields may be added, never removed).

Resume rules (each refusal names the knob): the model config must be unchanged, except the knobs
that only pick kernels (``KERNEL_CHOICE_KEYS``); the optimizer state
must come from the same optimizer kind (CPU fp32 vs GPU mixed precision / distributed); the data
position needs the same global batch size and the same shards. At another TP/CP/PP/DP layout everything
else reshards: weights and optimizer through ``dist_checkpointing``, the data position through
streaming's elastic determinism (same samples per step at any DP size).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject

from videoar_common.config import config_changes, config_to_dict, describe_changes
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import InputError
from videoar_megatron.training import dist_ckpt

OPTIMIZER_SHARDING = {"distrib_optim_sharding_type": "fully_reshardable"}
"""Megatron distributed-optimizer checkpoint format that reshards over TP, PP and DP."""


class ResumeError(InputError, RuntimeError):
    """A checkpoint cannot continue this run; the message says which knob differs and what to do."""


# --- RNG ----------------------------------------------------------------------------------------

def rng_state(device: torch.device) -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "random": random.getstate()}
    if device.type == "cuda":
        from megatron.core import tensor_parallel
        state["cuda"] = torch.cuda.get_rng_state(device)
        state["tracker"] = tensor_parallel.get_cuda_rng_tracker().get_states()
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["random"])
    if device.type == "cuda" and "cuda" in state:
        from megatron.core import tensor_parallel
        torch.cuda.set_rng_state(state["cuda"], device)
        tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _rng_object(ctx: DistContext) -> ShardedObject:
    return ShardedObject("rng_state", rng_state(ctx.device), (ctx.world_size,), (ctx.rank,), replica_id=0)


# --- state dicts --------------------------------------------------------------------------------

def optimizer_format(optimizer) -> str:
    """A name for the optimizer's checkpoint format (resume refuses a different one)."""
    names = sorted({type(o).__name__ for o in _leaves(optimizer)})
    return "+".join("FP32Optimizer" if n == "HostFP32Optimizer" else n for n in names)


def _leaves(optimizer) -> list:
    from megatron.core.optimizer.optimizer import ChainedOptimizer
    return optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer) else [optimizer]


def prime_optimizer_state(optimizer) -> None:
    """Give a freshly built distributed optimizer its (placeholder) state before a load template is
    built: with torch's AdamW (no Apex / Transformer Engine) its ``state_dict`` asserts on an empty
    state. Megatron's own helper steps once on zero gradients; the load then overwrites the main
    weights, moments and step, and the model weights are not touched."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    for leaf in _leaves(optimizer):
        if isinstance(leaf, DistributedOptimizer) and not leaf.optimizer.state:
            leaf._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` for a loaded checkpoint, working around a Megatron-core bug
    (0.16.1, every distributed-optimizer format, torch AdamW i.e. without Apex / Transformer Engine):
    ``_set_main_param_and_optimizer_states`` copies every key of the AdamW state, but the loaded
    tensors carry no per-parameter ``step`` (Megatron restores it from the param groups), so the copy
    raises ``KeyError: 'step'``. During the load each parameter's ``step`` is set aside and put back;
    with a fixed Megatron this is a no-op. Then every parameter gets its own ``step`` tensor (see below).
    Both found by resuming the GPU engine on a CPU emulation; the GPU resume tests cover them."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    patched = [leaf for leaf in _leaves(optimizer) if isinstance(leaf, DistributedOptimizer)]
    for leaf in patched:
        leaf._set_main_param_and_optimizer_states = _without_step(leaf)
    try:
        optimizer.load_state_dict(state)
    finally:
        for leaf in patched:
            del leaf._set_main_param_and_optimizer_states  # back to the class method
    for leaf in patched:
        # Megatron gives every parameter the *same* step tensor; torch's foreach AdamW then increments
        # it once per parameter per step (wrong bias correction). One tensor per parameter.
        for param_state in leaf.optimizer.state.values():
            if isinstance(param_state.get("step"), torch.Tensor):
                param_state["step"] = param_state["step"].clone()


def _without_step(leaf):
    original = type(leaf)._set_main_param_and_optimizer_states.__get__(leaf)

    def set_states(model_param, tensors):
        group_index, group_order = leaf.model_param_group_index_map[model_param]
        main_param = leaf.optimizer.param_groups[group_index]["params"][group_order]
        param_state = leaf.optimizer.state[main_param]
        step = param_state.pop("step", None) if "step" not in tensors else None
        try:
            original(model_param, tensors)
        finally:
            if step is not None:
                param_state["step"] = step
    return set_states


def sharded_state(model, optimizer, ctx: DistContext, *, is_loading: bool, with_optimizer: bool = True,
                  with_rng: bool = True) -> dict:
    """The sharded state dict of a checkpoint (for saving, or as the load template)."""
    model_sd = dist_ckpt.model_sharded_state_dict(model, ctx)
    state = dict(model_sd)
    if with_optimizer and is_loading:
        prime_optimizer_state(optimizer)
    if with_optimizer:
        state[dist_ckpt.OPTIMIZER_KEY] = optimizer.sharded_state_dict(model_sd, is_loading=is_loading,
                                                                      metadata=OPTIMIZER_SHARDING)
    if with_rng:
        state["rng_state"] = _rng_object(ctx)
    return state


def train_state(*, step: int, consumed_samples: int, cfg, layout, data_state: dict, manifests: dict,
                schedule: list, run_id: str, scheduler, guard, optimizer, skipped_steps: int) -> dict:
    """Rank 0's ``train_state.json`` (the AR checkpoint contract plus what resuming needs).
    ``manifests``: per data source, the manifest summary; the first is the main source, whose
    schedule, latent frames and tokenizer the contract's top-level fields describe."""
    manifest = next(iter(manifests.values()))
    return {
        "format_version": dist_ckpt.FORMAT_VERSION,
        "step": step,
        "consumed_samples": consumed_samples,
        "model_config": config_to_dict(cfg.model),
        "scale_schedule": [list(s) for s in schedule],
        "latent_frames": manifest.get("latent_frames"),
        "tokenizer_hash": manifest.get("tokenizer_hash"),
        "logger_run_id": run_id,
        "layout": layout.as_dict(),
        "data_state": data_state,
        "data": {"path": cfg.data.path, "manifest": manifest, "sources": manifests},
        "scheduler": scheduler.state_dict(),
        "numerics": guard.state_dict(),
        "skipped_steps": skipped_steps,
        "optimizer_format": optimizer_format(optimizer),
        "config": config_to_dict(cfg),
    }


# --- checks -------------------------------------------------------------------------------------

def _first_difference(a: Any, b: Any, path: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{path}.{key}" if path else key)
            if diff:
                return diff
        return None
    return None if json.dumps(a) == json.dumps(b) else f"{path}: {a!r} in the checkpoint, {b!r} now"


KERNEL_CHOICE_KEYS = ("attention_backend", "flex_kernel", "attention_split_tokens")
"""Model knobs that choose kernels, not the function computed (one mask rule; results differ by
rounding only). A run may resume with another value (e.g. switch to model.flex_kernel=flash), and a
checkpoint written before such a knob existed still resumes."""


def _model_difference(saved_model: dict, cfg) -> str | None:
    """The model-config differences that matter for resuming (kernel choices left out), the knobs this
    run sets first and what follows from them after (``model.hidden_size`` before the
    ``model.ffn_hidden_size`` derived from it); ``None`` when there are none."""
    changes = config_changes(saved_model, cfg.model, "model.", sources=cfg, skip=KERNEL_CHOICE_KEYS)
    return describe_changes(changes) if changes else None


def check_resumable(saved: dict, *, cfg, manifests: dict, optimizer) -> None:
    """Raise :class:`ResumeError` if this run cannot continue from ``saved`` (a train_state)."""
    diff = _model_difference(saved["model_config"], cfg)
    if diff:
        raise ResumeError(f"the model config changed since the checkpoint ({diff}); resume with the "
                          f"same model, or start a new run with checkpoint.load for the weights")
    have = optimizer_format(optimizer)
    if saved.get("optimizer_format") != have:
        raise ResumeError(f"the checkpoint's optimizer state was written by {saved.get('optimizer_format')} and "
                          f"this run uses {have} (CPU fp32 vs GPU mixed precision / optim.distributed_optimizer); "
                          f"resume with the same settings, or start a new run with checkpoint.load (weights only)")
    diff = _first_difference(saved["data"].get("sources"), manifests)
    if diff:
        raise ResumeError(f"the token shards differ from the checkpoint's (manifest {diff}); the data "
                          f"position cannot continue on other shards: start a new stage with checkpoint.load")


def check_same_tokenizer(saved: dict, manifest: dict, path) -> None:
    """Initial weights must come from a model trained on the same tokenizer's bits (a new stage
    continues the old one's token space); seed checkpoints carry no tokenizer and pass."""
    have, want = saved.get("tokenizer_hash"), manifest.get("tokenizer_hash")
    if have and want and have != want:
        raise ResumeError(f"checkpoint.load={path} was trained on tokenizer {have[:12]}… but the shards of this "
                          f"run come from tokenizer {want[:12]}…: the bits would mean something else; "
                          f"pre-tokenize with the same tokenizer (data.tokenizer_hash pins it)")


def load_initial_weights(path: Path, model, optimizer, cfg, manifest: dict, ctx: DistContext) -> None:
    """``checkpoint.load``: the model weights of ``path`` at this run's layout (new optimizer, schedule
    and data). A model whose parameter shapes changed is refused naming the config differences."""
    saved = dist_ckpt.read_train_state(path)
    check_same_tokenizer(saved, manifest, path)
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException, not an Exception
    try:
        dist_ckpt.load_model_weights(path, model, ctx)
    except (Exception, CheckpointException) as e:
        diff = _model_difference(saved.get("model_config", {}), cfg)
        raise ResumeError(f"checkpoint.load={path}: the weights do not fit this model"
                          + (f" ({diff})" if diff else "") + f": {e}") from e
    optimizer.reload_model_params()  # mixed-precision main weights follow the loaded model weights


def same_layout(saved: dict, layout) -> bool:
    s = saved["layout"]
    return (s["tp"], s.get("cp", 1), s["pp"], s["world_size"]) == (layout.tp, layout.cp, layout.pp,
                                                                    layout.world_size)


def resolve_weights_path(path: str | Path) -> Path:
    """``checkpoint.load``: a committed step directory, or a checkpoint root (its newest step)."""
    path = Path(path)
    if dist_ckpt.is_committed(path):
        return path
    latest = dist_ckpt.find_newest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"checkpoint.load={path}: neither a committed checkpoint (step_*/COMMITTED) "
                                f"nor a directory holding one")
    return latest
