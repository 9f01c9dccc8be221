"""The token layout of one VideoAR sequence: which token is text, which is (frame, scale, row, col).

Layout (S = |Ψ| + T·L + P tokens, identical for every sample of a batch)::

    [ prefix: |Ψ| text/class tokens | frame 0: scale 0 … K-1 | frame 1: scale 0 … K-1 | … | P pads ]

L = Σ_k h_k·w_k tokens per latent frame; inside a scale tokens are row-major over the scale's own
grid (the order of ``MultiScaleBSQ.flatten_bits``). Frames and scales are 0-based in code (the paper
counts from 1). Images are one-frame videos (T = 1). Trailing pads exist only so that the length
divides the tensor-parallel size under sequence parallelism; they are masked and carry no loss.

Every per-token property that the mask, RoPE, input embedding and loss need comes from one place,
:class:`LayoutTables`, so that they can never disagree about where a token sits.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

Scale = tuple[int, int]

TEXT, VIDEO, PAD = 0, 1, 2
"""Token kinds in ``LayoutTables.kind_S``."""

INDEX_SLACK = 512
"""Entries every index table the mask reads (:class:`LayoutTables`, the split path's and context
parallelism's position tables) holds in its storage past its end, filled with harmless values (a valid
position, frame 0, a pad token). FlashAttention-4 (``model.flex_kernel=flash``) evaluates the mask rule on
whole tiles and, in FA4 4.0's block-sparse Hopper forward, wraps the indices of rows and columns past the
sequence only on the first key tile it visits (``flash_attn/cute/block_sparse_utils.py``: the other tiles
pass ``mask_seqlen=False``, which turns off ``wrap_aux_indices`` in ``mask.py``). The last query tile
therefore reads the tables up to a tile (at most 256 positions) beyond their end. Read from whatever lies
after the tensor, a value that becomes an index (the frame-table lookup
``frame_visible_BTT[b, frame_index_S[q], frame_index_S[k]]``) addressed arbitrary memory: the crash of
FLASH with the Random Frame Mask (CUDA "operation not supported on global/shared address space", sessions
8-10). The slack makes every such read land on our own entries; the tables' shapes stay S."""


def index_table(values: torch.Tensor, device: torch.device | str, fill: int = 0) -> torch.Tensor:
    """``values`` (1-D) on ``device``, stored with :data:`INDEX_SLACK` entries of ``fill`` after its
    end: a view of ``len(values)`` entries whose storage a kernel may read past (see INDEX_SLACK).
    Copying the view (``.to``, ``.clone``, indexing) drops the slack: keep the returned tensor."""
    stored = torch.cat([values, values.new_full((INDEX_SLACK,), fill)]).to(device)
    return stored[:len(values)]


@dataclass(frozen=True)
class TokenLayout:
    """Static shape of a batch's sequence (hashable: tables are cached per layout and device)."""

    prefix_len: int
    """|Ψ|: prefix tokens (class tokens or padded caption length)."""
    scales: tuple[Scale, ...]
    """Scale schedule (h_k, w_k); the last is the latent grid."""
    frames: int
    """T: latent frames (1 for images)."""
    pad: int = 0
    """Trailing pad tokens."""

    def __post_init__(self):
        if self.frames < 1 or self.prefix_len < 0 or self.pad < 0 or not self.scales:
            raise ValueError(f"invalid layout {self}")

    @staticmethod
    def padded(prefix_len: int, scales, frames: int, multiple: int = 1) -> "TokenLayout":
        """Layout whose total length is a multiple of ``multiple``."""
        scales = tuple((int(h), int(w)) for h, w in scales)
        core = prefix_len + frames * sum(h * w for h, w in scales)
        return TokenLayout(prefix_len, scales, frames, (-core) % multiple)

    @property
    def num_scales(self) -> int:
        return len(self.scales)

    @property
    def tokens_per_frame(self) -> int:
        return sum(h * w for h, w in self.scales)

    @property
    def video_len(self) -> int:
        """N = T·L video tokens."""
        return self.frames * self.tokens_per_frame

    @property
    def seq_len(self) -> int:
        """S = |Ψ| + N + P."""
        return self.prefix_len + self.video_len + self.pad

    @property
    def scale_offsets(self) -> tuple[int, ...]:
        """Start of each scale inside a frame, plus the frame length at the end."""
        out, acc = [0], 0
        for h, w in self.scales:
            acc += h * w
            out.append(acc)
        return tuple(out)

    def step_slice(self, frame: int, scale: int) -> slice:
        """Sequence positions of the tokens of (frame, scale): one AR step of sampling."""
        start = self.prefix_len + frame * self.tokens_per_frame + self.scale_offsets[scale]
        h, w = self.scales[scale]
        return slice(start, start + h * w)

    def tables(self, device: torch.device | str = "cpu") -> "LayoutTables":
        return _tables(self, str(device))

    def large_blocks(self, min_tokens: int) -> tuple[tuple[int, int], ...]:
        """``(start, end)`` sequence ranges of every (frame, scale) block of at least ``min_tokens``
        tokens, in sequence order (``min_tokens <= 0``: none)."""
        if min_tokens <= 0:
            return ()
        return tuple((s.start, s.stop) for t in range(self.frames) for k in range(self.num_scales)
                     for s in [self.step_slice(t, k)] if s.stop - s.start >= min_tokens)


@dataclass(frozen=True)
class LayoutTables:
    """Per-token tables over the whole sequence (length S); text and pads use -1 where undefined."""

    kind_S: torch.Tensor
    """TEXT / VIDEO / PAD."""
    frame_S: torch.Tensor
    """Latent frame of a video token, -1 otherwise."""
    scale_S: torch.Tensor
    """Scale index of a video token, -1 otherwise."""
    row_S: torch.Tensor
    """Row on the scale's own grid (video), prefix index (text), 0 (pads)."""
    col_S: torch.Tensor
    """Column on the scale's own grid (video), prefix index (text), 0 (pads)."""
    frame_start_S: torch.Tensor
    """Sequence position of the first token of the token's frame (video); own position otherwise."""
    block_end_S: torch.Tensor
    """One past the last position of the token's (frame, scale) block (video); own position + 1
    otherwise. Tokens of a frame are ordered by scale, so 'same frame, scale <= k' is the range
    [frame_start, block_end): the mask tests ranges instead of gathering frame and scale ids."""
    frame_index_S: torch.Tensor
    """int32 frame of a video token, 0 otherwise: the Random Frame Mask's lookup index. FlexAttention's
    FLASH backend (model.flex_kernel=flash) compiled neither a clamp of ``frame_S`` nor int64 gather
    indices (the versions and errors: docs/BENCHMARKS.md); where it is read, the key is an earlier
    frame's video token, so the 0 of other tokens is never used."""
    prefix_len: int
    """|Ψ|: positions below it are the prefix."""


def _video_tables(layout: TokenLayout) -> tuple[torch.Tensor, ...]:
    scale, row, col = [], [], []
    for k, (h, w) in enumerate(layout.scales):
        rr, cc = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        scale.append(torch.full((h * w,), k))
        row.append(rr.reshape(-1))
        col.append(cc.reshape(-1))
    scale_L, row_L, col_L = (torch.cat(x) for x in (scale, row, col))
    T, L = layout.frames, layout.tokens_per_frame
    frame_N = torch.arange(T).repeat_interleave(L)
    return frame_N, scale_L.repeat(T), row_L.repeat(T), col_L.repeat(T)


@functools.lru_cache(maxsize=64)
def _tables(layout: TokenLayout, device: str) -> LayoutTables:
    P, N, pad = layout.prefix_len, layout.video_len, layout.pad
    frame_N, scale_N, row_N, col_N = _video_tables(layout)
    text = torch.arange(P)
    kind = torch.cat([torch.full((P,), TEXT), torch.full((N,), VIDEO), torch.full((pad,), PAD)])
    minus = torch.full((P,), -1)
    frame = torch.cat([minus, frame_N, torch.full((pad,), -1)])
    scale = torch.cat([minus, scale_N, torch.full((pad,), -1)])
    row = torch.cat([text, row_N, torch.zeros(pad, dtype=torch.long)])
    col = torch.cat([text, col_N, torch.zeros(pad, dtype=torch.long)])
    frame_start, block_end = _ranges(layout)
    # Slack fill per table (INDEX_SLACK): a pad token at position 0 of frame 0, seeing only itself.
    tables = ((kind, PAD), (frame, -1), (scale, -1), (row, 0), (col, 0), (frame_start, 0), (block_end, 1))
    return LayoutTables(*(index_table(t.long(), device, fill) for t, fill in tables),
                        frame_index_S=index_table(frame.clamp(min=0).int(), device, 0), prefix_len=P)


def _ranges(layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """(frame_start_S, block_end_S): see :class:`LayoutTables`."""
    S, P, L = layout.seq_len, layout.prefix_len, layout.tokens_per_frame
    pos = torch.arange(S)
    frame_start, block_end = pos.clone(), pos + 1
    ends = torch.tensor(layout.scale_offsets[1:])  # end of each scale within a frame
    for t in range(layout.frames):
        start = P + t * L
        scale_end_L = torch.repeat_interleave(ends, ends - torch.tensor(layout.scale_offsets[:-1]))
        frame_start[start:start + L] = start
        block_end[start:start + L] = start + scale_end_L
    return frame_start, block_end
