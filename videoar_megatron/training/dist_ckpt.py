"""Reshardable AR checkpoints on Megatron ``dist_checkpointing``, committed by a marker written last.

Layout under the run's checkpoint root::

    step_00001000/            one checkpoint
        (dist_checkpointing files: metadata.json, common.pt, *.distcp)
        train_state.json      step, consumed samples, data-loader state, logger run id, layout
        COMMITTED             written last, by rank 0, after every rank finished writing
    latest is found by the markers, never by modification times.

Design decision (synchronous saves, :func:`save_checkpoint`): on CUDA the stock ``torch_dist`` strategy
is used. On CPU it cannot be as such: its writer pre-loads tensors with ``non_blocking=True`` and then
calls ``torch.cuda.synchronize()``, and the manager of its results queue is a spawned process that
re-imports the launching script. :class:`SyncTorchDistSaveStrategy` writes the same ``torch_dist``
format with PyTorch's synchronous ``FileSystemWriter`` and Megatron's own planner, so checkpoints from
CPU and GPU runs are interchangeable and load through the same code.

Asynchronous saves (:class:`AsyncCheckpointer`, the trainer's default) are Megatron's own: the stock
``torch_dist`` strategy's ``async_save`` (``dist_checkpointing.save(..., async_sharded_save=True)``)
plans the save and returns an ``AsyncRequest``; Megatron's ``AsyncCallsQueue`` copies the tensors to
host memory (on CUDA; the only part the step loop waits for besides planning) and forks a process that
writes them (``FileSystemWriterAsync``); the queue's finalization, collective and polled once per step,
writes DCP's ``.metadata`` and ``metadata.json`` once every rank's writer is done, and then our commit
(:func:`videoar_common.atomic.commit_step_dir`) writes the marker. The same files as a synchronous
save, on CPU and CUDA alike, so both kinds of checkpoint load through :func:`load_checkpoint`. On a
host without CUDA the queue's CUDA calls go to the host in a scoped redirect
(:func:`.cuda_compat.host_async_checkpointing`); on CPU the forked writer's copy-on-write memory is the
snapshot. The launching script must guard its entry (``if __name__ == "__main__"``), as ``videoar`` and
``python -m videoar_megatron.cli`` do: Megatron's writer starts its results queue's manager with spawn.
"""
from __future__ import annotations

import contextlib
import functools
import json
import time
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner, _replace_state_dict_keys_with_sharded_keys, mcore_to_pyt_state_dict)
from torch.distributed import checkpoint as torch_dcp

from videoar_common.atomic import (atomic_write_json, commit_step_dir, is_committed, latest_committed,
                                   open_step_dir, save_committed_step)
from videoar_common.distributed import DistContext
from videoar_megatron.training.cuda_compat import host_async_checkpointing

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


class AsyncCheckpointer:
    """Checkpoints written in the background (see the module docstring), committed by the protocol of
    :func:`save_checkpoint`; at most one in flight. Every method is collective (all ranks, same order).

    ``write_delay_s`` holds each background write that long before it starts (``debug.slow_async_save_s``:
    drills of a slow file system; the step loop goes on meanwhile)."""

    def __init__(self, ctx: DistContext, *, write_delay_s: float = 0.0, worker: str = "fork"):
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
        if worker == "persistent" and ctx.device.type != "cuda":
            raise ValueError(f"checkpoint.async_worker=persistent needs CUDA (its worker copies GPU memory it "
                             f"receives over CUDA IPC; this run is on {ctx.device.type}, where the forked writer's "
                             f"copy-on-write memory is the snapshot): set checkpoint.async_worker=fork")
        self.ctx, self.write_delay_s = ctx, write_delay_s
        # fork: a writer forked per save (Megatron's default); persistent: one worker kept (CheckpointConfig)
        self.queue = AsyncCallsQueue(persistent=worker == "persistent")
        self.strategy = None
        """One ``torch_dist`` save strategy for every save of the run, keeping Megatron's cached save plans
        and metadata (``cached_metadata``, Megatron-LM's ``--ckpt-assume-constant-structure``): from the
        third save on, planning skips the exchange of every rank's plan while the structure holds (Megatron
        compares it with the cached one each time and plans afresh when it changed)."""
        self.in_flight: Path | None = None
        """The step directory being written, uncommitted (None when nothing is in flight)."""
        self._started = 0.0
        self._committed: list[tuple[Path, float]] = []
        self.last_stall: dict[str, float] = {}
        """Where the step loop's wait in the last :meth:`save` went, seconds: ``previous_commit`` (waiting for
        the save before it), ``plan`` (Megatron's planning and metadata exchange), ``copy_and_fork`` (the
        tensors copied to host memory, the writer process forked)."""

    def _host_scope(self):
        return contextlib.nullcontext() if self.ctx.device.type == "cuda" else host_async_checkpointing()

    def save(self, root: str | Path, step: int, sharded_state_dict: dict, train_state: dict, *,
             keep_last: int = 0, before_commit=None) -> Path:
        """Wait for the previous save's commit, then plan this one, copy it to host memory and hand it to
        a background writer; returns the (uncommitted) step directory. ``before_commit`` as in
        :func:`save_checkpoint`, run at the commit."""
        from megatron.core.dist_checkpointing.strategies.torch import TorchDistSaveShardedStrategy
        t0 = time.perf_counter()
        self.wait()
        t1 = time.perf_counter()
        path = open_step_dir(root, step, self.ctx)
        first = self.strategy is None
        if first:
            self.strategy = TorchDistSaveShardedStrategy("torch_dist", 1, cached_metadata=True)
        # The sharding is validated on the first save; later saves of the same run shard the same way.
        request = dist_checkpointing.save(sharded_state_dict, str(path), async_sharded_save=True,
                                          sharded_strategy=self.strategy, validate_access_integrity=first)
        if self.ctx.is_main:
            atomic_write_json(path / TRAIN_STATE_FILE, train_state)
        request.add_finalize_fn(lambda: self._commit(root, step, keep_last, before_commit))
        if self.write_delay_s and request.async_fn is not None:
            request = request._replace(async_fn=functools.partial(_delayed, request.async_fn, self.write_delay_s))
        t2 = time.perf_counter()
        with self._host_scope():
            self.queue.schedule_async_request(request)
        self.in_flight, self._started = path, time.perf_counter()
        self.last_stall = {"previous_commit": t1 - t0, "plan": t2 - t1, "copy_and_fork": self._started - t2}
        return path

    def _commit(self, root, step: int, keep_last: int, before_commit) -> None:
        path = commit_step_dir(root, step, self.ctx, keep_last=keep_last, before_commit=before_commit)
        self._committed.append((path, time.perf_counter() - self._started))
        self.in_flight = None

    def poll(self) -> list[tuple[Path, float]]:
        """Commit the save in flight if every rank's writer is done (one small all-reduce while a save
        is in flight, none otherwise); returns what was committed now, with the seconds since it was handed
        to the writer."""
        return self._finalize(blocking=False)

    def wait(self) -> list[tuple[Path, float]]:
        """Block until the save in flight (if any) is committed: before the next save, a requeue exit
        or the end of the run."""
        return self._finalize(blocking=True)

    def close(self) -> None:
        """Not collective: stop the background writer (a persistent worker exits; a save still in flight is
        abandoned uncommitted, the previous checkpoint stays the newest committed)."""
        with self._host_scope():
            self.queue.close(abort=self.in_flight is not None)

    def _finalize(self, blocking: bool) -> list[tuple[Path, float]]:
        if self.queue.get_num_unfinalized_calls():
            with self._host_scope():
                self.queue.maybe_finalize_async_calls(blocking=blocking)
        done, self._committed = self._committed, []
        return done


def _delayed(write, seconds: float, *args, **kwargs):
    """``write(*args, **kwargs)`` after ``seconds`` (module level: a persistent worker receives it pickled)."""
    time.sleep(seconds)
    return write(*args, **kwargs)


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


def model_chunks(model) -> list:
    """``model`` as a list of chunks (a model, or the chunks of an interleaved pipeline)."""
    return list(model) if isinstance(model, (list, tuple)) else [model]


def chunk_key(index: int) -> str:
    """Top-level key of virtual-pipeline chunk ``index`` in a state dict (more than one chunk only)."""
    return f"{MODEL_KEY}{index}"


def model_sharded_state_dict(model, ctx: DistContext) -> dict:
    """The model's Megatron sharded state dict under the checkpoint's ``model.`` prefix. The chunks of an
    interleaved pipeline go under ``model0``, ``model1``, ... (their module paths repeat: each has its own
    ``decoder.layers.0``), but their sharded keys are global (``model.decoder.layers`` stacked at each
    layer's global index), so the checkpoint is the same as at PP = 1 and reshards to any layout."""
    from megatron.core import parallel_state
    metadata = {"dp_cp_group": parallel_state.get_data_parallel_group(with_context_parallel=True)}
    chunks = model_chunks(model)
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict(prefix=f"{MODEL_KEY}.", metadata=metadata)
    return {chunk_key(i): c.sharded_state_dict(prefix=f"{MODEL_KEY}.", metadata=metadata) for i, c in enumerate(chunks)}


def load_model_weights(path: str | Path, model, ctx: DistContext) -> dict:
    """Load only the model weights of a committed checkpoint into ``model`` (a model or its chunks, any
    TP/PP layout); returns the checkpoint's train_state (which holds the resolved config)."""
    state, train_state = load_checkpoint(path, model_sharded_state_dict(model, ctx))
    apply_model_state(model, state, path)
    return train_state


def apply_model_state(model, state: dict, path: str | Path = "checkpoint") -> None:
    """Copy the ``model.``-prefixed entries of a loaded state dict into ``model`` (strict; each chunk
    its own ``model<i>`` entry when there are several)."""
    chunks = model_chunks(model)
    for i, chunk in enumerate(chunks):
        loaded = state if len(chunks) == 1 else state[chunk_key(i)]
        model_state = {k: v for k, v in loaded.items() if k.startswith(f"{MODEL_KEY}.")}
        missing, unexpected = chunk.load_state_dict(_strip_prefix(model_state, f"{MODEL_KEY}."), strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            where = "" if len(chunks) == 1 else f" (virtual pipeline chunk {i})"
            raise RuntimeError(f"{path}: checkpoint does not fit the model{where}: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")


def _strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
