"""Context parallelism (long videos): the sequence split over the ranks of a CP group, balanced by attention work.

Design decisions:

- **Groups and gradients are Megatron-core's.** ``parallel.context_parallel`` becomes
  ``initialize_model_parallel(context_parallel_size=...)`` (:mod:`.parallel`); gradients of a replica's
  CP ranks are reduced together with the data-parallel ones over Megatron's ``dp_cp`` group (its DDP,
  distributed optimizer and ``finalize_model_grads`` already do; the local CPU engine uses the same group).
- **Chunks dealt by work, not by position.** The (padded) sequence is cut into chunks of
  ``parallel.context_parallel_chunk`` tokens. A chunk's work is the number of (query, key) pairs the mask
  lets through for its queries, counted by the mask rule itself (:func:`row_work`), so any change to the
  rule changes the balance with it. Chunks go to ranks by torch's processing-time round-robin scheduler
  for context-parallel FlexAttention (``_PTRRLoadBalancer.ptrr_scheduling``): equal chunk counts per rank,
  near-equal work. Head-tail (zigzag) chunks, Megatron's ``get_batch_on_this_cp_rank`` and torch's
  default, balance a causal mask's linear ramp; the VideoAR mask with a Random Frame Mask window is a
  ramp that flattens after w frames, and there head-tail leaves ranks far apart (figures from
  :func:`attended_pairs_per_rank` in docs/training.md). The balance uses the run's window without the
  Random Frame Mask drop, which is drawn per sample and thins every earlier frame alike in expectation.
- **Nothing is permuted.** A rank holds its chunks in ascending sequence order; the keys/values
  all-gathered over the group arrive rank after rank. The mask rule receives index tables (the rank's
  query positions, the gathered key positions) and so sees sequence positions: one rule, dense SDPA on
  CPU and FlexAttention on CUDA as without CP. A chunk of 128 tokens (the default) is FlexAttention's
  block, so every BlockMask block is a block of the unsplit mask and the sparsity is kept.
- **K/V exchange: Megatron's differentiable mappings.** ``gather_from_sequence_parallel_region`` over
  the CP group: all-gather in forward, reduce-scatter of the key/value gradients in backward. torch's
  ``context_parallel()`` does the same for FlexAttention (all-gather, a BlockMask rewritten per rank) but
  through DTensor dispatch on a DeviceMesh, with ring attention only for causal SDPA; it cannot carry the
  per-sample mask tables to the CPU's dense path, so only its scheduler is used.
- **Loss.** Each rank's loss is its video tokens' weighted cross-entropy divided by the weight sum of
  *all* the sample's video tokens (:func:`videoar_megatron.model.loss.bit_loss` with ``video_index_n``);
  the sum over the CP ranks is the unsplit loss for any per-token weights. Megatron's DDP averages
  gradients over DP x CP, so before backward the loss is multiplied by CP, as Megatron's schedules do
  (``forward_step_calc_loss``: ``output_tensor *= cp_group_size``); the local engine does the same.

Sampling never splits (KV-cached decoding runs one (frame, scale) step at a time; docs/sampling.md).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from videoar_megatron.model.layout import VIDEO, TokenLayout, index_table
from videoar_megatron.model.mask import dense_mask, draw_frame_visibility

REPRESENTATIVE_ROWS = 64
"""Query rows per dense-mask call when counting work (bounds the index grids at long sequences)."""


def sequence_multiple(parallel) -> int:
    """What the padded sequence length must be a multiple of for ``parallel`` (a ``ParallelConfig``):
    TP under sequence parallelism; CP x chunk under context parallelism, each rank's share again a
    multiple of TP under sequence parallelism."""
    tp = parallel.tensor_parallel if parallel.sequence_parallel else 1
    if parallel.context_parallel == 1:
        return tp
    return parallel.context_parallel * math.lcm(parallel.context_parallel_chunk, tp)


def check_context_parallel(model, parallel) -> None:
    """Refuse a model knob that context parallelism cannot honour (``model``: a ``ModelConfig``)."""
    if parallel.context_parallel > 1 and model.attention_split_tokens:
        raise ValueError(f"model.attention_split_tokens={model.attention_split_tokens} needs the keys in "
                         f"sequence order; with parallel.context_parallel={parallel.context_parallel} set it to 0")


# --- work per query ------------------------------------------------------------------------------

def _runs(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(first position, length) of each run of queries that see the same keys: one per (frame, scale)
    block, all prefix rows (each sees the |Ψ| valid prefix keys), all pads (each sees itself)."""
    t = layout.tables()
    video = t.kind_S == VIDEO
    key_3S = torch.stack([t.kind_S, torch.where(video, t.frame_start_S, 0), torch.where(video, t.block_end_S, 0)])
    change_S = torch.cat([torch.ones(1, dtype=torch.bool), (key_3S[:, 1:] != key_3S[:, :-1]).any(0)])
    starts = torch.nonzero(change_S).flatten()
    lengths = torch.diff(torch.cat([starts, torch.tensor([layout.seq_len])]))
    return starts, lengths


@functools.lru_cache(maxsize=32)
def row_work(layout: TokenLayout, window: int = 0) -> torch.Tensor:
    """Keys each query attends to ``(S,)`` (int64), by the mask rule, with the full caption and the
    deterministic frame table of ``window`` (no Random Frame Mask drop). The rule is evaluated for one
    query per run of queries that see the same keys, so it costs (frames x scales) rows, not S."""
    starts, lengths = _runs(layout)
    visible = draw_frame_visibility(1, layout.frames, window=window)
    text_len = torch.tensor([layout.prefix_len])
    counts = [dense_mask(layout.tables(), visible, text_len, q_positions=starts[r:r + REPRESENTATIVE_ROWS]).sum(-1)
              .flatten() for r in range(0, len(starts), REPRESENTATIVE_ROWS)]
    return torch.repeat_interleave(torch.cat(counts), lengths)


# --- the balanced split ----------------------------------------------------------------------------

def check_divisible(layout: TokenLayout, size: int, chunk: int) -> None:
    if layout.seq_len % (size * chunk):
        raise ValueError(f"sequence of {layout.seq_len} tokens is not a multiple of parallel.context_parallel "
                         f"({size}) x parallel.context_parallel_chunk ({chunk}); build the batch with "
                         f"pad_to_multiple=context_parallel.sequence_multiple(parallel)")


PTRR_MODULES = ("torch.distributed.tensor.experimental._context_parallel._load_balancer",
                "torch.distributed.tensor.experimental._load_balancer")
"""Where torch keeps its (private, prototype) context-parallel load balancers: the package it moved them
into (2.14 here), then the module they were added in."""


def ptrr_scheduler():
    """torch's ``_PTRRLoadBalancer.ptrr_scheduling(process_time, group_size)``."""
    import importlib
    for name in PTRR_MODULES:
        try:
            return importlib.import_module(name)._PTRRLoadBalancer.ptrr_scheduling
        except (ImportError, AttributeError):
            continue
    raise RuntimeError(f"parallel.context_parallel > 1 needs torch's context-parallel PTRR load balancer "
                       f"(added to torch in October 2025; torch 2.14 has it), which torch {torch.__version__} "
                       f"lacks: none of {PTRR_MODULES} defines it")


@functools.lru_cache(maxsize=32)
def balanced_chunks(layout: TokenLayout, size: int, chunk: int, window: int = 0) -> tuple[tuple[int, ...], ...]:
    """Chunk indices (ascending) of each of ``size`` ranks: equal counts, work balanced by torch's
    processing-time round-robin scheduler (see the module docstring)."""
    check_divisible(layout, size, chunk)
    work_C = row_work(layout, window).view(-1, chunk).sum(-1)
    groups = ptrr_scheduler()(work_C, size)  # (size, chunks / size), rows ascending
    return tuple(tuple(int(c) for c in row) for row in groups)


def rank_positions(layout: TokenLayout, size: int, chunk: int, window: int = 0) -> list[torch.Tensor]:
    """Sequence positions held by each rank, ascending (host tensors)."""
    offsets = torch.arange(chunk)
    return [(torch.tensor(chunks)[:, None] * chunk + offsets).flatten()
            for chunks in balanced_chunks(layout, size, chunk, window)]


def attended_pairs_per_rank(layout: TokenLayout, size: int, chunk: int, window: int = 0) -> list[int]:
    """(query, key) pairs each rank's queries attend to (pads count one each: themselves); what the dry
    run prints and the balance test bounds."""
    work_S = row_work(layout, window)
    return [int(work_S[pos].sum()) for pos in rank_positions(layout, size, chunk, window)]


@dataclass(frozen=True)
class ContextSplit:
    """One rank's share of a layout's sequence (device tensors)."""

    size: int
    rank: int
    local_S: torch.Tensor
    """Sequence positions of this rank's tokens, ascending: its embeddings, layers, queries."""
    gathered_S: torch.Tensor
    """Sequence position of each key/value after the all-gather (rank after rank)."""
    mask_q_S: torch.Tensor
    """``local_S`` as int32, the mask's query table: FlexAttention's FLASH backend does not compile int64
    indices (see ``LayoutTables.frame_index_S``); stored with slack (``layout.INDEX_SLACK``)."""
    mask_kv_S: torch.Tensor
    """``gathered_S`` as int32, the mask's key table."""
    video_rows_s: torch.Tensor
    """Rows of the local sequence that are video tokens (the head's inputs)."""
    video_index_n: torch.Tensor
    """Which of the N video tokens those rows are (the logits' targets and loss weights)."""


@functools.lru_cache(maxsize=32)
def context_split(layout: TokenLayout, size: int, rank: int, chunk: int, window: int, device: str) -> ContextSplit:
    """Rank ``rank`` of ``size``'s share of ``layout``, chunks of ``chunk`` balanced for ``window``."""
    positions = rank_positions(layout, size, chunk, window)
    local = positions[rank]
    video_rows = torch.nonzero(layout.tables().kind_S[local] == VIDEO).flatten()
    gathered = torch.cat(positions)
    return ContextSplit(size=size, rank=rank, local_S=local.to(device), gathered_S=gathered.to(device),
                        mask_q_S=index_table(local.int(), device), mask_kv_S=index_table(gathered.int(), device),
                        video_rows_s=video_rows.to(device),
                        video_index_n=(local[video_rows] - layout.prefix_len).to(device))


def gather_sequence(x_sBHD: torch.Tensor, group) -> torch.Tensor:
    """All-gather ``[s, ...]`` over the CP group along the sequence (rank after rank); backward
    reduce-scatters the gradient (Megatron's mapping, a no-op for a one-rank group)."""
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region
    return gather_from_sequence_parallel_region(x_sBHD, tensor_parallel_output_grad=True, group=group)

