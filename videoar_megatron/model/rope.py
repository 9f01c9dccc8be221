"""Multi-scale temporal 3-D RoPE (VideoAR Eq. 7).

Positions: prefix token i gets (i, i, i); the video token of frame t, scale k at (r, c) gets
(t + |Ψ|, r' + |Ψ|, c' + |Ψ|) with (r', c') = (r, c) on the scale's own grid (paper Fig. 2, default) or
(round(r·H_K/h_k), round(c·W_K/w_k)) on the final grid (Infinity). Pads get (0, 0, 0).

Frequencies: one ladder θ_j = base^(-2j/head_dim), j < head_dim/2, as in 1-D RoPE; each rotary pair j
is given to one axis (t, h or w) and rotates by that axis' position · θ_j. Because a prefix token has
the same index on all three axes, text is *exactly* 1-D RoPE (the paper's principle 1), whatever the
split. Pairs are dealt to axes round-robin ('interleaved', default) so every axis spans high and low
frequencies; 'sectioned' gives contiguous blocks as in M-RoPE (t gets the fastest frequencies).

Design decision: RoPE is handed to Megatron as ``rotary_pos_emb`` angles ``[S, 1, 1, head_dim]``
(pair j at dims j and j + head_dim/2, Megatron's non-interleaved layout). Megatron's
``apply_rotary_pos_emb`` already takes arbitrary per-token angles, runs on CPU, and applies RoPE
before core attention, so the KV cache stores rotated keys and the core attention stays RoPE-free.
"""
from __future__ import annotations

import torch

from videoar_megatron.model.layout import VIDEO, LayoutTables, TokenLayout


def axis_split(head_dim: int, split: tuple[int, int, int] | None = None) -> tuple[int, int, int]:
    """Rotary pairs per (t, h, w): the given split, or equal thirds with the remainder to t."""
    pairs = head_dim // 2
    if split is not None:
        if sum(split) != pairs:
            raise ValueError(f"rope.axis_split {split} must sum to head_dim/2 = {pairs}")
        return tuple(split)
    third = pairs // 3
    return (pairs - 2 * third, third, third)


def pair_axes(head_dim: int, split: tuple[int, int, int] | None = None,
              layout: str = "interleaved") -> torch.Tensor:
    """Axis (0 = t, 1 = h, 2 = w) of each rotary pair j, ``(head_dim/2,)`` long."""
    counts = list(axis_split(head_dim, split))
    if layout == "sectioned":
        return torch.cat([torch.full((n,), a) for a, n in enumerate(counts)])
    if layout != "interleaved":
        raise ValueError(f"rope.axis_layout must be interleaved or sectioned, got {layout!r}")
    axes = []
    while any(counts):
        for a in range(3):
            if counts[a]:
                axes.append(a)
                counts[a] -= 1
    return torch.tensor(axes, dtype=torch.long)


def positions(layout: TokenLayout, tables: LayoutTables, grid: str = "own") -> torch.Tensor:
    """RoPE positions ``(S, 3)`` long: (t, h, w) per token as in Eq. 7."""
    P = layout.prefix_len
    row, col = tables.row_S, tables.col_S
    if grid == "final":
        H, W = layout.scales[-1]
        hk = torch.tensor([h for h, _ in layout.scales], device=row.device)
        wk = torch.tensor([w for _, w in layout.scales], device=row.device)
        k = tables.scale_S.clamp(min=0)
        # Same rounding as Infinity's rope2d_normalized_by_hw == 2: round(i * H_K / h_k).
        row = torch.where(tables.kind_S == VIDEO, torch.round(row * H / hk[k]).long(), row)
        col = torch.where(tables.kind_S == VIDEO, torch.round(col * W / wk[k]).long(), col)
    elif grid != "own":
        raise ValueError(f"rope.grid must be own or final, got {grid!r}")
    video = tables.kind_S == VIDEO
    t = torch.where(video, tables.frame_S + P, row)
    h = torch.where(video, row + P, row)
    w = torch.where(video, col + P, col)
    return torch.stack([t, h, w], dim=-1)


def inverse_frequencies(head_dim: int, base: float) -> torch.Tensor:
    """θ_j = base^(-2j/head_dim), the 1-D RoPE ladder, ``(head_dim/2,)`` float64."""
    return base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)


def rotary_angles(pos_S3: torch.Tensor, head_dim: int, *, base: float = 10000.0,
                  split: tuple[int, int, int] | None = None, layout: str = "interleaved") -> torch.Tensor:
    """Megatron ``rotary_pos_emb``: angles ``[S, 1, 1, head_dim]`` float32 (pair j at j and j + D/2)."""
    axes_J = pair_axes(head_dim, split, layout).to(pos_S3.device)
    pos_SJ = pos_S3[:, axes_J].double()
    angles_SJ = pos_SJ * inverse_frequencies(head_dim, base).to(pos_S3.device)
    return torch.cat([angles_SJ, angles_SJ], dim=-1).float()[:, None, None, :]
