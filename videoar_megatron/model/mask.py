"""The VideoAR attention mask: one rule, evaluated by every kernel.

Rules (paper §4.2, Eq. 9; 0-based frames t and scales k):

- text ↔ text: bidirectional inside the prefix; text never sees video.
- video → text: always (only valid prefix keys: a caption shorter than |Ψ| masks its padding).
- video (t, k) → video (t', k'): visible iff t' = t and k' <= k (block-causal over scales,
  bidirectional inside a scale), or t' < t and frame t' is in query frame t's context.
- Random Frame Mask: query frame t's context is {t' : t - w <= t' < t, m_{t,t'} = 1} with
  m_{t,t'} ~ Bernoulli(1 - p_mask), drawn per sample and per query frame (training only; w = 0 means
  unlimited). Its own frame t is always visible through the block-causal rule.
- Pads (and any token with nothing else to see) see themselves, so no softmax row is empty.

Design decision: the rule is written once, :func:`mask_rule`, as tensor arithmetic over per-token
tables (:class:`LayoutTables`) and two per-sample tables: ``frame_visible_BTT`` (earlier frames in
context, the RFM draw) and ``text_len_B``. The same function is the FlexAttention ``mask_mod`` (GPU:
compiled block-sparse ``BlockMask``) and, evaluated over broadcast index grids, the dense boolean mask
for SDPA (CPU, and the KV-cached rows of sampling). The random draw lives in the batch, never in
the model forward, so every tensor/pipeline rank of one replica sees the same mask.
"""
from __future__ import annotations

import functools

import torch

from videoar_megatron.model.layout import PAD, VIDEO, LayoutTables
from videoar_megatron.model.rng import Generators, rand_rows

DENSE_ROWS = 1024
"""Query rows per chunk when building the dense mask."""


def frame_visibility(keep_BTT: torch.Tensor, window: int = 0) -> torch.Tensor:
    """``frame_visible_BTT[b, t, t']``: earlier frame t' is in query frame t's context (Eq. 9):
    t - w <= t' < t (w = 0: unlimited) and the keep bit ``keep_BTT[b, t, t']``."""
    T = keep_BTT.shape[-1]
    t = torch.arange(T, device=keep_BTT.device)
    context_TT = t[None, :] < t[:, None]
    if window > 0:
        context_TT &= (t[:, None] - t[None, :]) <= window
    return context_TT & keep_BTT.bool()


def draw_frame_visibility(batch: int, frames: int, *, window: int = 0, p_mask: float = 0.0,
                          generator: Generators = None,
                          device: torch.device | str = "cpu") -> torch.Tensor:
    """Random Frame Mask draw: keep bits m_{t,t'} ~ Bernoulli(1 - p_mask) per sample and query frame.

    ``p_mask = 0`` gives the deterministic (inference) table: every earlier frame inside the window.
    """
    keep = torch.ones(batch, frames, frames, dtype=torch.bool)
    if p_mask > 0:
        keep = (rand_rows((batch, frames, frames), generator) >= p_mask).cpu()
    return frame_visibility(keep, window).to(device)


def mask_rule(b, q_idx, kv_idx, tables: LayoutTables, frame_visible_BTT: torch.Tensor,
              text_len_B: torch.Tensor, full_context: bool = False) -> torch.Tensor:
    """True where query ``q_idx`` of sample ``b`` may attend to key ``kv_idx``.

    Arguments are integer tensors that broadcast together (0-d under FlexAttention's vmap; grids for
    the dense mask). Written as range tests over per-token tables (``frame_start_S``, ``block_end_S``)
    because FlexAttention evaluates it per element of every partially-masked block: each gather costs.
    ``full_context=True`` is the promise that every earlier frame is in context for every sample (no
    Random Frame Mask drop, unlimited window), which turns the frame-table lookup into a range test.
    """
    kind_q = tables.kind_S[q_idx]
    # text_len <= |Ψ|: a key below it is a valid (unpadded) prefix key
    to_text = (kind_q != PAD) & (kv_idx < text_len_B[b])
    frame_start_q = tables.frame_start_S[q_idx]
    # same frame, scale <= k: tokens of a frame are ordered by scale
    own_frame = (kv_idx >= frame_start_q) & (kv_idx < tables.block_end_S[q_idx])
    earlier = (kv_idx >= tables.prefix_len) & (kv_idx < frame_start_q)
    if not full_context:
        earlier = earlier & frame_visible_BTT[b, tables.frame_index_S[q_idx], tables.frame_index_S[kv_idx]]
    return to_text | ((kind_q == VIDEO) & (own_frame | earlier)) | (q_idx == kv_idx)


def is_full_context(frame_visible_BTT: torch.Tensor) -> bool:
    """Whether every earlier frame is visible to every query frame of every sample (host sync)."""
    T = frame_visible_BTT.shape[-1]
    lower = torch.ones(T, T, dtype=torch.bool, device=frame_visible_BTT.device).tril(-1)
    return bool((frame_visible_BTT == lower).all())


def dense_mask(tables: LayoutTables, frame_visible_BTT: torch.Tensor, text_len_B: torch.Tensor,
               q_start: int = 0, q_end: int | None = None, kv_end: int | None = None,
               full_context: bool = False, q_positions: torch.Tensor | None = None,
               kv_positions: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask ``(B, 1, Q, KV)`` for SDPA (True = attend), rows ``q_start:q_end``.

    The row range serves KV-cached sampling: the queries of one (frame, scale) step against every
    key cached so far. ``q_positions`` (instead of the range) selects any rows, in that order: the
    queries that the split attention leaves to the mask, or a context-parallel rank's queries.
    ``kv_positions`` gives the sequence position of each key column, in that order (context
    parallelism: the keys as gathered from the ranks); the rule always sees sequence positions.
    """
    S = tables.kind_S.shape[0]
    device = tables.kind_S.device
    if q_positions is None:
        q_end = S if q_end is None else q_end
        q_positions = torch.arange(q_start, q_end, device=device)
        kv_end = q_end if kv_end is None else kv_end
    else:
        kv_end = S if kv_end is None else kv_end
    if kv_positions is None:
        kv_positions = torch.arange(kv_end, device=device)
    b = torch.arange(frame_visible_BTT.shape[0], device=device)[:, None, None]
    kv = kv_positions[None, None, :]
    # Row chunks bound the broadcast int64 index grids of the frame-table lookup (B x rows x KV).
    chunks = [mask_rule(b, q_positions[r:r + DENSE_ROWS][None, :, None], kv,
                        tables, frame_visible_BTT, text_len_B, full_context)
              for r in range(0, len(q_positions), DENSE_ROWS)]
    return torch.cat(chunks, dim=1)[:, None]


def mask_mod(tables: LayoutTables, frame_visible_BTT: torch.Tensor, text_len_B: torch.Tensor,
             full_context: bool = False, q_positions: torch.Tensor | None = None,
             kv_positions: torch.Tensor | None = None):
    """The rule as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx)`` (heads share one mask); with
    ``q_positions`` query ``q_idx`` is the token at sequence position ``q_positions[q_idx]``, with
    ``kv_positions`` key ``kv_idx`` the one at ``kv_positions[kv_idx]`` (index tables: the rule sees
    sequence positions whatever order the kernel holds the tokens in)."""
    def videoar_mask(b, h, q_idx, kv_idx):
        return mask_rule(b, q_idx, kv_idx, tables, frame_visible_BTT, text_len_B, full_context)

    def subset_mask(b, h, q_idx, kv_idx):
        return mask_rule(b, q_positions[q_idx], kv_idx, tables, frame_visible_BTT, text_len_B, full_context)

    def tabled_mask(b, h, q_idx, kv_idx):
        q = q_idx if q_positions is None else q_positions[q_idx]
        return mask_rule(b, q, kv_positions[kv_idx], tables, frame_visible_BTT, text_len_B, full_context)
    if kv_positions is not None:
        return tabled_mask
    return videoar_mask if q_positions is None else subset_mask


def block_mask(tables: LayoutTables, frame_visible_BTT: torch.Tensor, text_len_B: torch.Tensor,
               block_size: int = 128, full_context: bool | None = None,
               q_positions: torch.Tensor | None = None, kv_positions: torch.Tensor | None = None):
    """FlexAttention ``BlockMask`` from the same rule (block-sparse; compiled on CUDA), for every query
    or for the queries at ``q_positions`` (ascending), against every key in sequence order or the keys
    at ``kv_positions`` (in that order).

    ``full_context=None`` checks the frame table (one host sync) and takes the cheaper rule when no
    frame is masked."""
    from torch.nn.attention.flex_attention import create_block_mask
    S = tables.kind_S.shape[0]
    device = tables.kind_S.device
    if full_context is None:
        full_context = is_full_context(frame_visible_BTT)
    rule = mask_mod(tables, frame_visible_BTT, text_len_B, full_context, q_positions, kv_positions)
    Q = S if q_positions is None else len(q_positions)
    KV = S if kv_positions is None else len(kv_positions)
    return create_block_mask(rule, frame_visible_BTT.shape[0],
                             None, Q, KV, device=device, BLOCK_SIZE=block_size,
                             _compile=device.type == "cuda")


@functools.lru_cache(maxsize=1)
def compiled_flex_attention():
    """``torch.compile(flex_attention)``, built once per process (eager flex is a slow reference)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)
