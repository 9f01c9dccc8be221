"""The KV-cached decode loop on a tiny model (CPU, one process): sampled tokens fed back through a
teacher-forced forward reproduce the cached logits; cache = recompute; γ = 1 = conditional branch;
seeds; batch independence; known prefixes; every condition kind."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from sample_helpers import D, LATENT_FRAMES, SCALES, make_model, model_config
from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.sequence import build_batch
from videoar_megatron.sampling.bits import sample_key
from videoar_megatron.sampling.cfg import guidance_table
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler
from tests.process_groups import single_process_groups

Q = MultiScaleBSQ(dim=D, scales=SCALES)
K, L = len(SCALES), Q.tokens_per_frame


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as g:
        yield g


def sampler_of(model, cfg, **knobs) -> VideoARSampler:
    raw = {"guidance": {"schedule": "ucf101"}, "top_p": 0.95}
    raw.update(knobs)
    return VideoARSampler(model, Q, cfg, build_dataclass(SamplingConfig, raw), window_frames=LATENT_FRAMES)


def keys(n: int, seed: int = 0, offset: int = 0) -> torch.Tensor:
    return torch.tensor([sample_key(seed, offset + i) for i in range(n)])


LABELS = Conditions.labels([1, 3, 4])


def token_gamma(layout, table_TK: torch.Tensor) -> torch.Tensor:
    tables, P = layout.tables(), layout.prefix_len
    frame, scale = (x[P:P + layout.video_len] for x in (tables.frame_S, tables.scale_S))
    return table_TK[frame, scale].float()[None, :, None]


@pytest.mark.parametrize("window", [0, 1])
def test_sampled_bits_fed_back_teacher_forced_reproduce_the_cached_logits(groups, window):
    """Guided logits of every step = γ·cond + (1-γ)·uncond of one full forward on the sampled bits
    (with a Random Frame Mask window too: the cache obeys the same mask rule)."""
    cfg = model_config(num_query_groups=2, mask={"rfm_window": window, "rfm_p_mask": 0.0})
    model = make_model(cfg, groups)
    sampler = sampler_of(model, cfg)
    out = sampler.generate(LABELS, keys(3), record_logits=True)
    assert out.bits_BTLd.shape == (3, LATENT_FRAMES, L, D) and out.known_frames == 0
    frac = out.bits_BTLd.float().mean().item()
    assert 0.2 < frac < 0.8
    batch = build_batch(Q, cfg, bits_BTLd=out.bits_BTLd, cond=LABELS.class_B, training=False)
    with torch.no_grad():
        cond, uncond = model(batch), model(batch.unconditional())
    gamma = token_gamma(batch.layout, guidance_table(sampler.cfg.guidance, LATENT_FRAMES, K))
    torch.testing.assert_close(out.logits_BTLd.reshape(3, -1, D), gamma * cond + (1 - gamma) * uncond,
                               atol=1e-4, rtol=1e-4)
    # and the latent is the quantizer's decode of the sampled bits, frame by frame
    latent = Q.decode_bits(Q.unflatten_bits(out.bits_BTLd.reshape(-1, L, D)))
    torch.testing.assert_close(out.latent_BdTHW, latent.reshape(3, LATENT_FRAMES, D, 4, 4).transpose(1, 2),
                               atol=0, rtol=0)


def test_cached_decoding_equals_recomputing_the_prefix(groups):
    cfg = model_config()
    model = make_model(cfg, groups)
    cached = sampler_of(model, cfg).generate(LABELS, keys(3), record_logits=True)
    recomputed = sampler_of(model, cfg, kv_cache=False).generate(LABELS, keys(3), record_logits=True)
    assert torch.equal(cached.bits_BTLd, recomputed.bits_BTLd)
    torch.testing.assert_close(cached.logits_BTLd, recomputed.logits_BTLd, atol=1e-4, rtol=1e-4)


def test_gamma_one_is_the_conditional_branch(groups):
    """γ = 1 at every step but the last: the two-branch batch gives the conditional-only decode."""
    cfg = model_config()
    model = make_model(cfg, groups)
    plain = sampler_of(model, cfg, guidance={"schedule": "constant", "gamma": 1.0})
    table = [[1.0] * K for _ in range(LATENT_FRAMES)]
    table[-1][-1] = 4.0
    guided = sampler_of(model, cfg, guidance={"schedule": "table", "table": table})
    a = plain.generate(LABELS, keys(3), record_logits=True)
    b = guided.generate(LABELS, keys(3), record_logits=True)
    assert plain._plans[(3, LATENT_FRAMES, 0, True)].rows == 3          # no unconditional rows at all
    assert guided._plans[(3, LATENT_FRAMES, 0, True)].rows == 6
    last = Q.tokens_per_frame - 16                                       # the last scale: 4x4 tokens
    assert torch.equal(a.bits_BTLd[:, :-1], b.bits_BTLd[:, :-1])
    assert torch.equal(a.bits_BTLd[:, -1, :last], b.bits_BTLd[:, -1, :last])
    torch.testing.assert_close(b.logits_BTLd[:, :, :last], a.logits_BTLd[:, :, :last], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(b.logits_BTLd[:, -1, last:], a.logits_BTLd[:, -1, last:])


def test_same_seed_same_bits_and_batches_do_not_matter(groups):
    cfg = model_config()
    model = make_model(cfg, groups)
    sampler = sampler_of(model, cfg)
    a = sampler.generate(LABELS, keys(3)).bits_BTLd
    assert torch.equal(a, sampler.generate(LABELS, keys(3)).bits_BTLd)
    assert not torch.equal(a, sampler.generate(LABELS, keys(3, seed=1)).bits_BTLd)
    for i in range(3):  # one at a time, with the same per-sample keys
        alone = sampler.generate(LABELS.select(slice(i, i + 1)), keys(1, offset=i)).bits_BTLd
        assert torch.equal(alone[0], a[i])


def test_known_frames_are_teacher_forced_and_the_rest_continues(groups):
    cfg = model_config()
    model = make_model(cfg, groups)
    sampler = sampler_of(model, cfg)
    full = sampler.generate(LABELS, keys(3), record_logits=True)
    cont = sampler.generate(LABELS, keys(3), known_bits_BTLd=full.bits_BTLd[:, :1], record_logits=True)
    assert cont.known_frames == 1
    assert torch.equal(cont.bits_BTLd, full.bits_BTLd)                  # same keys → same continuation
    torch.testing.assert_close(cont.logits_BTLd[:, 1:], full.logits_BTLd[:, 1:], atol=1e-4, rtol=1e-4)
    assert not cont.logits_BTLd[:, 0].any()                              # known frames are not sampled
    other = torch.zeros_like(full.bits_BTLd[:, :2])
    diverted = sampler.generate(LABELS, keys(3), known_bits_BTLd=other)
    assert torch.equal(diverted.bits_BTLd[:, :2], other)
    assert not torch.equal(diverted.bits_BTLd[:, 2], full.bits_BTLd[:, 2])
    short = sampler.generate(LABELS, keys(3), frames=2)
    assert torch.equal(short.bits_BTLd, full.bits_BTLd[:, :2])          # a shorter window is a prefix


@pytest.mark.parametrize("kind", ["text_tokens", "text_features", "none"])
def test_text_and_unconditional_checkpoints_sample(groups, kind):
    cfg = model_config(condition={"kind": kind, "vocab_size": 50, "text_len": 4, "feature_dim": 12})
    model = make_model(cfg, groups)
    sampler = sampler_of(model, cfg, guidance={"schedule": "t2v"})
    if kind == "none":
        cond = Conditions.unconditional(2)
    else:
        text = torch.randint(0, 50, (2, 4)) if kind == "text_tokens" else torch.randn(2, 4, 12)
        cond = Conditions.text(kind, text, [2, 4])
    out = sampler.generate(cond, keys(2), record_logits=True)
    assert out.bits_BTLd.shape == (2, LATENT_FRAMES, L, D)
    if kind == "none":
        return
    batch = build_batch(Q, cfg, bits_BTLd=out.bits_BTLd, cond=cond.text_BP, text_len_B=cond.text_len_B,
                        training=False)
    with torch.no_grad():
        c, u = model(batch), model(batch.unconditional())
    gamma = token_gamma(batch.layout, guidance_table(sampler.cfg.guidance, LATENT_FRAMES, K))
    torch.testing.assert_close(out.logits_BTLd.reshape(2, -1, D), gamma * c + (1 - gamma) * u, atol=1e-4, rtol=1e-4)
    padded = dataclasses.replace(cond, text_BP=cond.text_BP.clone())
    padded.text_BP[0, 2:] = (padded.text_BP[0, 2:] + 1) % 50          # caption padding of sample 0
    assert torch.equal(sampler.generate(padded, keys(2)).bits_BTLd, out.bits_BTLd)


def test_errors_name_what_is_wrong(groups):
    cfg = model_config()
    model = make_model(cfg, groups)
    sampler = sampler_of(model, cfg)
    with pytest.raises(ValueError, match="conditioned on 'class'"):
        sampler.generate(Conditions.unconditional(1), keys(1))
    with pytest.raises(ValueError, match=r"class labels must be in \[0, 5\)"):
        sampler.generate(Conditions.labels([7]), keys(1))
    with pytest.raises(ValueError, match="a window holds 1..3 latent frames"):
        sampler.generate(LABELS, keys(3), frames=4)
    with pytest.raises(ValueError, match="leave nothing to decode"):
        sampler.generate(LABELS, keys(3), known_bits_BTLd=torch.zeros(3, 3, L, D, dtype=torch.bool))
