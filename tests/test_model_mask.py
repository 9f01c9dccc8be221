"""The VideoAR attention mask equals a brute-force reference written straight from the paper's rules.

The reference below knows nothing of the implementation's tables: it enumerates tokens with loops and
applies the rules of §4.2 / Eq. 9 one pair at a time.
"""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.mask import (block_mask, dense_mask, draw_frame_visibility, frame_visibility,
                                         is_full_context, mask_mod)


def reference_tokens(prefix_len, scales, frames, pad):
    """[(kind, frame, scale)] in sequence order, enumerated from the layout's definition."""
    tokens = [("text", None, None)] * prefix_len
    for t in range(frames):
        for k, (h, w) in enumerate(scales):
            tokens += [("video", t, k)] * (h * w)
    return tokens + [("pad", None, None)] * pad


def reference_mask(tokens, text_len, keep, window, anchor_first=False):
    """Python loops over the rules: keep[t][t'] is query frame t's Bernoulli keep bit for frame t';
    ``anchor_first``: frame 0 is in every later frame's context (no window, no drop)."""
    S = len(tokens)
    out = torch.zeros(S, S, dtype=torch.bool)
    for q, (kind_q, t_q, k_q) in enumerate(tokens):
        for kv, (kind_k, t_k, k_k) in enumerate(tokens):
            if q == kv:
                visible = True                                   # nobody has an empty row
            elif kind_q == "pad" or kind_k == "pad":
                visible = False
            elif kind_k == "text":
                visible = kv < text_len                          # text↔text and video→text, valid keys
            elif kind_q == "text":
                visible = False                                  # text never sees video
            elif t_k == t_q:
                visible = k_k <= k_q                             # block-causal over scales
            elif t_k < t_q and anchor_first and t_k == 0:
                visible = True                                   # the anchor frame
            elif t_k < t_q:
                in_window = window == 0 or t_q - window <= t_k
                visible = in_window and bool(keep[t_q][t_k])     # Random Frame Mask
            else:
                visible = False
            out[q, kv] = visible
    return out


def random_case(rng: random.Random, batch: int = 2):
    K = rng.randint(1, 4)
    scales, h, w = [], 1, 1
    for _ in range(K):
        scales.append((h, w))
        h, w = h + rng.randint(0, 2), w + rng.randint(0, 2)
    layout = TokenLayout(rng.choice([0, 1, 3]), tuple(scales), rng.randint(1, 4), rng.choice([0, 0, 2]))
    text_len = [rng.randint(1, layout.prefix_len) if layout.prefix_len else 0 for _ in range(batch)]
    return layout, torch.tensor(text_len)


@pytest.mark.parametrize("rfm,anchor", [(False, False), (True, False), (True, True)],
                         ids=["no_rfm", "rfm", "rfm_anchor_first"])
def test_dense_mask_equals_reference(rfm, anchor):
    rng = random.Random(0 if rfm else 1)
    for _ in range(25):
        layout, text_len = random_case(rng)
        B, T = 2, layout.frames
        window = rng.choice([0, 1, 2]) if rfm else 0
        keep = torch.rand(B, T, T, generator=torch.Generator().manual_seed(rng.randint(0, 999))) > 0.5 if rfm \
            else torch.ones(B, T, T, dtype=torch.bool)
        tables = layout.tables()
        visible = frame_visibility(keep, window, anchor_first=anchor)
        got = dense_mask(tables, visible, text_len)
        assert got.shape == (B, 1, layout.seq_len, layout.seq_len)
        tokens = reference_tokens(layout.prefix_len, layout.scales, T, layout.pad)
        for b in range(B):
            want = reference_mask(tokens, int(text_len[b]), keep[b].tolist(), window, anchor)
            assert torch.equal(got[b, 0], want), f"layout {layout}, window {window}, sample {b}"
        if is_full_context(visible):  # the cheaper rule GPU training takes without RFM drops
            assert torch.equal(dense_mask(tables, visible, text_len, full_context=True), got)


def test_without_rfm_video_part_is_lexicographic_block_causal():
    layout = TokenLayout(2, ((1, 1), (2, 2), (3, 3)), 3)
    tables = layout.tables()
    m = dense_mask(tables, draw_frame_visibility(1, 3), torch.tensor([2]))[0, 0]
    video = tables.kind_S == 1
    key = tables.frame_S * 100 + tables.scale_S
    want = key[:, None] >= key[None, :]
    assert torch.equal(m[video][:, video], want[video][:, video])


def test_flex_mask_mod_equals_dense_mask_and_flex_forward_matches_sdpa():
    """The GPU path's mask_mod, evaluated through FlexAttention's own machinery on CPU."""
    from torch.nn.attention.flex_attention import create_mask, flex_attention
    rng = random.Random(3)
    for _ in range(3):
        layout, text_len = random_case(rng)
        B, T = 2, layout.frames
        vis = draw_frame_visibility(B, T, window=1, p_mask=0.5, generator=torch.Generator().manual_seed(1))
        tables = layout.tables()
        dense = dense_mask(tables, vis, text_len)
        S = layout.seq_len
        assert torch.equal(create_mask(mask_mod(tables, vis, text_len), B, 1, S, S, device="cpu"), dense)
        full = draw_frame_visibility(B, T)
        assert is_full_context(full)
        assert not is_full_context(frame_visibility(torch.ones(1, 3, 3, dtype=torch.bool), window=1))
        assert torch.equal(create_mask(mask_mod(tables, full, text_len, full_context=True), B, 1, S, S,
                                       device="cpu"), dense_mask(tables, full, text_len))
        q, k, v = torch.randn(3, B, 2, S, 8).unbind(0)
        with torch.no_grad():  # FlexAttention has no CPU backward
            out = flex_attention(q, k, v, block_mask=block_mask(tables, vis, text_len))
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_frame_drop_rate_and_window():
    B, T, p = 4000, 5, 0.3
    vis = draw_frame_visibility(B, T, window=2, p_mask=p, generator=torch.Generator().manual_seed(0))
    t = torch.arange(T)
    in_window = (t[None, :] < t[:, None]) & (t[:, None] - t[None, :] <= 2)
    assert not vis[:, ~in_window].any()                       # never outside the window, never later
    kept = vis[:, in_window].float().mean().item()
    n = B * int(in_window.sum())
    assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5
    # Drawn independently per query frame: two query frames' bits for frame 0 are uncorrelated.
    a, b = vis[:, 1, 0].float(), vis[:, 2, 0].float()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item()) < 0.06


@pytest.mark.parametrize("anchor", [False, True], ids=["eq9", "anchor_first"])
def test_frame_zero_is_windowed_and_dropped_unless_anchored(anchor):
    """The decision: by default frame 0 is an earlier frame like any other (Eq. 9's set), so with
    window w = 2 the queries of frames 3.. never see it and inside the window it is dropped at rate
    p; with rfm_anchor_first every later frame sees it in every sample, and the other frames' bits are
    the same draw either way."""
    B, T, p = 4000, 6, 0.3
    draw = lambda a: draw_frame_visibility(B, T, window=2, p_mask=p, anchor_first=a,
                                           generator=torch.Generator().manual_seed(5))
    vis, other = draw(anchor), draw(not anchor)
    assert torch.equal(vis[:, :, 1:], other[:, :, 1:])             # frames 1..: untouched by the anchor
    to_frame0 = vis[:, 1:, 0].float()                              # query frames 1..5 → key frame 0
    if anchor:
        assert to_frame0.all()
    else:
        assert not to_frame0[:, 2:].any()                          # frames 3, 4, 5: outside the window
        kept = to_frame0[:, :2].mean().item()                      # frames 1, 2: inside, dropped at rate p
        assert abs(kept - (1 - p)) < 4 * (p * (1 - p) / (2 * B)) ** 0.5
    layout = TokenLayout(1, ((1, 1), (2, 2)), T)
    m = dense_mask(layout.tables(), vis[:3], torch.ones(3, dtype=torch.long))[:, 0]
    frame0 = slice(1, 1 + layout.tokens_per_frame)
    last = slice(1 + 5 * layout.tokens_per_frame, 1 + 6 * layout.tokens_per_frame)
    assert m[:, last, frame0].all() == anchor and m[:, last, frame0].any() == anchor


def test_padded_caption_keys_are_invisible_and_rows_never_empty():
    layout = TokenLayout(4, ((1, 1), (2, 2)), 2, pad=3)
    tables = layout.tables()
    m = dense_mask(tables, draw_frame_visibility(2, 2), torch.tensor([1, 4]))[:, 0]
    assert not m[0, :, 1:4].any(dim=0)[4:].any()              # sample 0: text keys 1..3 masked for video
    assert m[1, 4:4 + 10, :4].all()                           # sample 1: every video token sees all text
    assert m.any(-1).all()


def test_row_chunks_and_row_ranges_agree_with_the_whole_mask(monkeypatch):
    import videoar_megatron.model.mask as mask_lib
    layout = TokenLayout(2, ((1, 1), (2, 2), (3, 3)), 4, pad=1)
    text_len = torch.tensor([1, 2])
    vis = draw_frame_visibility(2, 4, window=2, p_mask=0.4, generator=torch.Generator().manual_seed(2))
    whole = dense_mask(layout.tables(), vis, text_len)
    monkeypatch.setattr(mask_lib, "DENSE_ROWS", 5)
    assert torch.equal(dense_mask(layout.tables(), vis, text_len), whole)
    assert torch.equal(dense_mask(layout.tables(), vis, text_len, 9, 23), whole[:, :, 9:23, :23])


def test_index_tables_let_the_rule_see_sequence_positions_in_any_token_order():
    """Context parallelism holds queries and keys in another order than the sequence (a rank's chunks;
    keys as gathered from the ranks): with query and key index tables, the dense mask and FlexAttention's
    mask_mod are the whole mask's rows and columns at those positions, in that order."""
    from torch.nn.attention.flex_attention import create_mask
    rng = random.Random(5)
    for _ in range(10):
        layout, text_len = random_case(rng)
        B, S = 2, layout.seq_len
        vis = draw_frame_visibility(B, layout.frames, window=rng.choice([0, 1]), p_mask=0.4,
                                    generator=torch.Generator().manual_seed(rng.randint(0, 99)))
        tables = layout.tables()
        whole = dense_mask(tables, vis, text_len)
        gen = torch.Generator().manual_seed(rng.randint(0, 99))
        q_pos = torch.randperm(S, generator=gen)[:max(1, S // 2)].sort().values
        kv_pos = torch.randperm(S, generator=gen)
        want = whole[:, :, q_pos][:, :, :, kv_pos]
        got = dense_mask(tables, vis, text_len, q_positions=q_pos, kv_positions=kv_pos)
        assert torch.equal(got, want), layout
        rule = mask_mod(tables, vis, text_len, q_positions=q_pos, kv_positions=kv_pos)
        assert torch.equal(create_mask(rule, B, 1, len(q_pos), S, device="cpu"), want)
        assert torch.equal(dense_mask(tables, vis, text_len, kv_positions=kv_pos), whole[:, :, :, kv_pos])


def test_the_rule_past_the_sequence_end_reads_only_the_tables_own_slack():
    """FlashAttention-4 evaluates the mask rule on whole tiles, up to a tile past the sequence end, and
    reads the index tables there (``layout.INDEX_SLACK``): every table the rule reads (the layout's, the
    split path's query table, context parallelism's query and key tables) holds harmless entries there,
    so the frame-table lookup of those positions stays inside the frame table. The positions past the end
    leave the in-range mask as it is."""
    import dataclasses
    from videoar_megatron.model.attention import split_plan
    from videoar_megatron.model.context_parallel import context_split
    from videoar_megatron.model.mask import mask_rule
    overrun = 256  # FA4's largest tile: how far past the end the last tile's indices reach
    layout = TokenLayout(8, ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)), 5, pad=3)
    S = layout.seq_len
    tables = layout.tables("cpu")

    def past_end(t):  # what a kernel reading a tile beyond the view sees (beyond the storage: an error)
        return torch.as_strided(t, (t.shape[0] + overrun,), (1,))
    tensors = {f.name: past_end(getattr(tables, f.name)) for f in dataclasses.fields(tables)
               if isinstance(getattr(tables, f.name), torch.Tensor)}
    extended = dataclasses.replace(tables, **tensors)
    vis = draw_frame_visibility(2, layout.frames, window=2, p_mask=0.3, generator=torch.Generator().manual_seed(0))
    assert not is_full_context(vis)
    text_len = torch.tensor([8, 3])
    positions = torch.arange(S + overrun)
    rule = mask_rule(torch.arange(2)[:, None, None], positions[None, :, None], positions[None, None, :],
                     extended, vis, text_len)  # an IndexError here: a frame index past the frame table
    assert rule[:, :S, :S].equal(dense_mask(tables, vis, text_len)[:, 0])
    assert extended.frame_index_S[S:].eq(0).all()

    cp_layout = TokenLayout.padded(8, layout.scales, layout.frames, 2 * 16)
    position_tables = [(split_plan(layout, 16, "cpu").rest_S, S),
                       *((t, cp_layout.seq_len) for rank in range(2)
                         for split in [context_split(cp_layout, 2, rank, 16, 2, "cpu")]
                         for t in (split.mask_q_S, split.mask_kv_S))]
    for table_S, seq_len in position_tables:
        slack = past_end(table_S)[table_S.shape[0]:]
        assert ((slack >= 0) & (slack < seq_len)).all()
