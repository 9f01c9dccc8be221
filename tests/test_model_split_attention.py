"""Split attention (``ModelConfig.attention_split_tokens``): large (frame, scale) blocks as unmasked SDPA
calls + the rest through the mask equals attention under the whole mask, for outputs and gradients;
it is used exactly when no frame is hidden (no Random Frame Mask drop or window)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.attention import AttentionInputs, split_plan, videoar_attention
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.mask import block_mask, dense_mask, draw_frame_visibility
from videoar_megatron.model.model import build_model
from videoar_megatron.model.sequence import build_batch
from tests.process_groups import single_process_groups

SCALES = ((1, 1), (2, 2), (2, 3), (3, 3))    # blocks of 1, 4, 6, 9 tokens per frame
LAYOUT = TokenLayout(3, SCALES, frames=3, pad=2)


def qkv_and_grad(B=2, H=4, kv_heads=4, D=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    S = LAYOUT.seq_len
    q = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(B, kv_heads, S, D, generator=gen, dtype=torch.float64) for _ in range(2))
    return [x.requires_grad_() for x in (q, k, v)], torch.randn(B, H, S, D, generator=gen, dtype=torch.float64)


def attend_with_grads(inputs, q, k, v, grad, gqa=False):
    out = videoar_attention(q, k, v, inputs, scale=0.3, gqa=gqa)
    return (out, *torch.autograd.grad(out, (q, k, v), grad))


def test_plan_covers_every_query_once():
    plan = split_plan(LAYOUT, 6, "cpu")
    assert plan.blocks == tuple((LAYOUT.step_slice(t, k).start, LAYOUT.step_slice(t, k).stop)
                                for t in range(3) for k in (2, 3))
    order = torch.cat([plan.rest_S, *(torch.arange(s, e) for s, e in plan.blocks)])
    assert torch.equal(order[plan.inverse_S], torch.arange(LAYOUT.seq_len))
    assert split_plan(LAYOUT, 10, "cpu") is None and LAYOUT.large_blocks(0) == ()


@pytest.mark.parametrize("text_len,kv_heads", [([3, 3], 4), ([3, 1], 4), ([2, 3], 2)])
def test_split_equals_whole_mask(text_len, kv_heads):
    """Full prefix, a padded caption (its padded keys hidden from the unmasked blocks), GQA."""
    text_len_B = torch.tensor(text_len)
    vis = draw_frame_visibility(2, LAYOUT.frames)
    tables = LAYOUT.tables()
    (q, k, v), grad = qkv_and_grad(kv_heads=kv_heads)
    gqa = kv_heads != 4
    whole = attend_with_grads(AttentionInputs(mask_B1QK=dense_mask(tables, vis, text_len_B)), q, k, v, grad, gqa)
    for min_tokens in (4, 6, 9):
        plan = split_plan(LAYOUT, min_tokens, "cpu")
        rows = dense_mask(tables, vis, text_len_B, q_positions=plan.rest_S, full_context=True)
        padded = None if min(text_len) == LAYOUT.prefix_len else tuple(text_len)
        split = attend_with_grads(AttentionInputs(mask_B1QK=rows, split=plan, text_len=padded), q, k, v, grad, gqa)
        for a, b in zip(split, whole):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_flex_subset_mask_equals_dense_rows():
    """The GPU path's query-subset BlockMask, evaluated by eager FlexAttention on CPU (forward only)."""
    from torch.nn.attention.flex_attention import flex_attention
    text_len_B = torch.tensor([3, 1])
    vis = draw_frame_visibility(2, LAYOUT.frames)
    tables, plan = LAYOUT.tables(), split_plan(LAYOUT, 6, "cpu")
    (q, k, v), _ = qkv_and_grad()
    q_rest = q.detach().float().index_select(2, plan.rest_S)
    k, v = k.detach().float(), v.detach().float()
    with torch.no_grad():
        out = flex_attention(q_rest, k, v, block_mask=block_mask(tables, vis, text_len_B, full_context=True,
                                                                 q_positions=plan.rest_S))
    rows = dense_mask(tables, vis, text_len_B, q_positions=plan.rest_S)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q_rest, k, v, attn_mask=rows),
                               atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as g:
        yield g


def model_run(groups, cfg, batch):
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, params_dtype=torch.float64)
    logits = model(batch)
    bit_loss(logits, batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
    return model, logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("p_mask", [0.0, 0.5])
def test_model_split_equals_unsplit_and_only_without_hidden_frames(groups, p_mask):
    raw = {"size": "tiny", "latent_dim": 8, "mask": {"rfm_window": 0, "rfm_p_mask": p_mask},
           "condition": {"kind": "class", "num_classes": 4}}
    on, off = (build_dataclass(ModelConfig, {**raw, "attention_split_tokens": n}) for n in (6, 0))
    q = MultiScaleBSQ(dim=8, scales=list(SCALES))
    latent = torch.randn(2, 8, 3, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    batch = build_batch(q, on, latent_BdTHW=latent, cond=torch.tensor([1, 2]), training=True,
                        generator=torch.Generator().manual_seed(1))
    batch = dataclasses.replace(batch, inputs_BNd=batch.inputs_BNd.double())
    model, split_logits, split_grads = model_run(groups, on, batch)
    inputs = model.attention_inputs(batch, slice(0, batch.layout.seq_len), None)
    hidden = p_mask > 0
    assert (inputs.split is None) == hidden
    _, logits, grads = model_run(groups, off, batch)
    torch.testing.assert_close(split_logits, logits, atol=1e-10, rtol=1e-10)
    assert split_grads.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(split_grads[name], grads[name], atol=1e-10, rtol=1e-10, msg=name)


def test_negative_split_tokens_is_an_error_naming_the_knob():
    with pytest.raises(ValueError, match="attention_split_tokens"):
        build_dataclass(ModelConfig, {"attention_split_tokens": -1})
