"""GPU promises of the sampler (run with `make test-gpu`): the random streams are the CPU's; the CUDA
graph decode is captured and equals eager decoding bit for bit (fp32 and bf16); cache = recompute and
teacher-forced logits = cached logits on CUDA; a graph is reused across batches (new labels, keys,
known frames) without recapture; the model config is restored afterwards."""
from __future__ import annotations

import pytest
import torch

from sample_helpers import D, LATENT_FRAMES, SCALES, make_tokenizer, model_config
from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.model import build_model
from videoar_megatron.model.sequence import build_batch
from videoar_megatron.sampling.bits import sample_key, uniform
from videoar_megatron.sampling.cfg import guidance_table
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.extend import generate_videos
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler
from tests.process_groups import single_process_groups

pytestmark = pytest.mark.gpu
Q = MultiScaleBSQ(dim=D, scales=SCALES)
LABELS = Conditions.labels([1, 3, 4])


@pytest.fixture(scope="module")
def groups():
    with single_process_groups("cuda") as g:
        yield g


def cuda_model(groups, dtype=torch.float32):
    cfg = model_config(num_query_groups=2)
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, device="cuda", params_dtype=dtype)
    with torch.no_grad():
        model.head.weight.mul_(20.0)
    return model.eval(), cfg


def sampler_of(model, cfg, **knobs):
    raw = {"guidance": {"schedule": "ucf101"}, "top_p": 0.95}
    raw.update(knobs)
    return VideoARSampler(model, Q, cfg, build_dataclass(SamplingConfig, raw), window_frames=LATENT_FRAMES)


def keys(n, seed=0):
    return torch.tensor([sample_key(seed, i) for i in range(n)])


def test_random_streams_are_identical_on_cpu_and_cuda():
    k = keys(8)
    assert torch.equal(uniform(k.cuda(), 11, 64, 48).cpu(), uniform(k, 11, 64, 48))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decode_equals_eager_and_is_reused(groups, dtype):
    model, cfg = cuda_model(groups, dtype)
    fused = (model.config.bias_activation_fusion, model.config.bias_dropout_fusion)
    graphed, eager = sampler_of(model, cfg), sampler_of(model, cfg, cuda_graph=False)
    a = graphed.generate(LABELS, keys(3), record_logits=True)
    plan = graphed._plans[(3, LATENT_FRAMES, 0, True)]
    assert plan.graph is not None and plan.graph_error is None, plan.graph_error
    b = eager.generate(LABELS, keys(3), record_logits=True)
    assert torch.equal(a.bits_BTLd, b.bits_BTLd)
    assert torch.equal(a.logits_BTLd, b.logits_BTLd)
    # replay with other labels, keys and known frames: no recapture, still equal to eager
    graph = plan.graph
    other = Conditions.labels([0, 0, 2])
    c = graphed.generate(other, keys(3, seed=5), known_bits_BTLd=a.bits_BTLd[:, :1])
    d = eager.generate(other, keys(3, seed=5), known_bits_BTLd=a.bits_BTLd[:, :1])
    assert graphed._plans[(3, LATENT_FRAMES, 1, False)].graph is not None
    assert torch.equal(c.bits_BTLd, d.bits_BTLd)
    e = graphed.generate(other, keys(3, seed=5), record_logits=True)
    assert plan.graph is graph and not torch.equal(e.bits_BTLd, a.bits_BTLd)
    assert (model.config.bias_activation_fusion, model.config.bias_dropout_fusion) == fused


def test_cached_equals_recompute_and_teacher_forcing_on_cuda(groups):
    model, cfg = cuda_model(groups)
    cached = sampler_of(model, cfg).generate(LABELS, keys(3), record_logits=True)
    recomputed = sampler_of(model, cfg, kv_cache=False).generate(LABELS, keys(3), record_logits=True)
    assert torch.equal(cached.bits_BTLd, recomputed.bits_BTLd)
    torch.testing.assert_close(cached.logits_BTLd, recomputed.logits_BTLd, atol=1e-3, rtol=1e-3)
    batch = build_batch(Q, cfg, bits_BTLd=cached.bits_BTLd, cond=LABELS.class_B.cuda(), training=False)
    with torch.no_grad():
        c, u = model(batch), model(batch.unconditional())       # FlexAttention on CUDA
    tables, P = batch.layout.tables("cuda"), batch.layout.prefix_len
    frame, scale = (x[P:P + batch.layout.video_len] for x in (tables.frame_S, tables.scale_S))
    g = guidance_table(build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}}).guidance,
                       LATENT_FRAMES, len(SCALES)).cuda()[frame, scale].float()[None, :, None]
    torch.testing.assert_close(cached.logits_BTLd.reshape(3, -1, D), g * c + (1 - g) * u, atol=1e-3, rtol=1e-3)


def test_videos_on_cuda_in_bf16(groups):
    model, cfg = cuda_model(groups, torch.bfloat16)
    tokenizer = make_tokenizer().to("cuda", torch.bfloat16)
    sampler = VideoARSampler(model, tokenizer.quantizer_for(SCALES), cfg,
                             build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}}),
                             window_frames=LATENT_FRAMES)
    video = generate_videos(sampler, tokenizer, LABELS, [0, 1, 2], seed=0, frames=21)
    assert video.shape == (3, 3, 21, 64, 64) and video.is_cuda and torch.isfinite(video).all()
    again = generate_videos(sampler, tokenizer, LABELS, [0, 1, 2], seed=0, frames=21)
    assert torch.equal(video, again)


def test_bf16_decode_repeats_bit_for_bit_at_batch_32(groups):
    """Same keys, same video, every call, graph or eager: VideoAR-L widths (4 layers) at the UCF-101
    shape, where the masked SDPA of the cached steps picked a nondeterministic kernel before it ran
    under deterministic kernel selection (benchmarks/check_sample_repro.py found it)."""
    from videoar_megatron.sampling.extend import window_keys
    scales = [(1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)]
    cfg = build_dataclass(ModelConfig, {"size": "L", "num_layers": 4, "latent_dim": 48,
                                        "condition": {"kind": "class", "num_classes": 101}})
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, device="cuda", params_dtype=torch.bfloat16)
    quantizer = MultiScaleBSQ(dim=48, scales=scales)
    cond, keys_B = Conditions.labels(torch.arange(32) % 101), window_keys(0, range(32), 0)
    outs = {}
    for engine in ("graph", "eager"):
        sampling = build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}, "top_p": 0.97,
                                                    "cuda_graph": engine == "graph"})
        sampler = VideoARSampler(model, quantizer, cfg, sampling, window_frames=5)
        outs[engine] = [sampler.generate(cond, keys_B, record_logits=True) for _ in range(3)]
    reference = outs["eager"][0]
    for engine, runs in outs.items():
        for i, out in enumerate(runs):
            assert torch.equal(out.logits_BTLd, reference.logits_BTLd), (engine, i)
            assert torch.equal(out.bits_BTLd, reference.bits_BTLd), (engine, i)
