"""Multi-scale temporal 3-D RoPE: text is exactly 1-D RoPE, video positions follow Eq. 7 / Fig. 2."""
from __future__ import annotations

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd

from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.rope import axis_split, pair_axes, positions, rotary_angles


def rope_1d_reference(x_SD: torch.Tensor, base: float) -> torch.Tensor:
    """Textbook 1-D RoPE (complex rotation) of pairs (x_j, x_{j+D/2}) at positions 0..S-1."""
    S, D = x_SD.shape
    theta = base ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    rot = torch.polar(torch.ones(S, D // 2, dtype=torch.float64), torch.arange(S)[:, None] * theta)
    z = torch.complex(x_SD[:, :D // 2].double(), x_SD[:, D // 2:].double()) * rot
    return torch.cat([z.real, z.imag], dim=-1).float()


@pytest.mark.parametrize("head_dim,split,layout", [(64, None, "interleaved"), (64, None, "sectioned"),
                                                    (96, (24, 12, 12), "interleaved"), (16, (2, 3, 3), "sectioned")])
def test_text_only_equals_1d_rope(head_dim, split, layout):
    lay = TokenLayout(prefix_len=12, scales=((1, 1),), frames=1)
    pos = positions(lay, lay.tables())
    angles = rotary_angles(pos, head_dim, base=10000.0, split=split, layout=layout)[:12]
    x = torch.randn(12, 1, 2, head_dim)  # [s, b, heads, d], Megatron's layout
    got = _apply_rotary_pos_emb_bshd(x, angles)  # what Megatron's attention does with rotary_pos_emb
    for h in range(2):
        torch.testing.assert_close(got[:, 0, h], rope_1d_reference(x[:, 0, h], 10000.0), atol=1e-5, rtol=1e-5)


def test_positions_match_paper_figure_2():
    """|Ψ| = 5 text tokens; frame 1: 1x1 then 2x2 scale; frame 2 likewise (paper counts from 1)."""
    lay = TokenLayout(prefix_len=5, scales=((1, 1), (2, 2)), frames=2)
    pos = positions(lay, lay.tables()).tolist()
    assert pos[:5] == [[i, i, i] for i in range(5)]
    assert pos[5] == [5, 5, 5]
    assert pos[6:10] == [[5, 5, 5], [5, 5, 6], [5, 6, 5], [5, 6, 6]]
    assert pos[10] == [6, 5, 5]
    assert pos[11:15] == [[6, 5, 5], [6, 5, 6], [6, 6, 5], [6, 6, 6]]


def test_final_grid_rescales_like_infinity():
    lay = TokenLayout(prefix_len=2, scales=((1, 1), (2, 3), (4, 6)), frames=1)
    pos = positions(lay, lay.tables(), grid="final")
    rows = pos[3:9, 1] - 2  # the 2x3 scale
    cols = pos[3:9, 2] - 2
    assert rows.tolist() == [0, 0, 0, 2, 2, 2]               # round(r * 4/2)
    assert cols.tolist() == [0, 2, 4, 0, 2, 4]               # round(c * 6/3)
    assert torch.equal(pos[9:], positions(lay, lay.tables())[9:])  # the final scale is unchanged


def test_axis_split_and_layouts():
    assert axis_split(64) == (12, 10, 10)                    # equal thirds, remainder to t
    axes = pair_axes(64, None, "interleaved")
    assert [int((axes == a).sum()) for a in range(3)] == [12, 10, 10]
    assert axes[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert pair_axes(64, None, "sectioned").tolist() == [0] * 12 + [1] * 10 + [2] * 10
    with pytest.raises(ValueError, match="axis_split"):
        axis_split(64, (10, 10, 10))


def test_video_axes_rotate_by_their_own_position():
    lay = TokenLayout(prefix_len=3, scales=((1, 1), (2, 2)), frames=2)
    pos = positions(lay, lay.tables())
    angles = rotary_angles(pos, 24, split=(4, 4, 4), layout="sectioned")[:, 0, 0, :12]
    theta = 10000.0 ** (-torch.arange(0, 24, 2, dtype=torch.float64) / 24)
    for s in range(lay.seq_len):
        want = torch.cat([pos[s, 0] * theta[:4], pos[s, 1] * theta[4:8], pos[s, 2] * theta[8:]]).float()
        torch.testing.assert_close(angles[s], want)
