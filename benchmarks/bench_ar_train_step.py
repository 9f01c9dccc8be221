"""Full training step of VideoAR-L next to a Megatron GPTModel of the same dimensions (causal attention).

Both models: 24 layers x 1536 x 12 heads, SwiGLU FFN 6144, RMSNorm, no biases, bf16 parameters, Megatron
column/row-parallel linears (TP=1), fused AdamW, same tokens per step. Differences are exactly what
VideoAR adds: the sequence builder on the GPU (error-correction requantization, RFM draw), the
per-step BlockMask build, FlexAttention under the VideoAR mask (vs causal SDPA/flash for GPT),
3-D RoPE angles (vs Megatron's 1-D RoPE) and the bit head (vs a 64-word LM head).

Printed per layout: step time, tokens/s and MFU (useful FLOPs: 6·matmul params·tokens + attention
over the pairs each mask lets through; backward = 2 x forward) for both models, with the ratio
VideoAR / GPT. The goal is a tokens/s ratio >= 0.9.

    python benchmarks/bench_ar_train_step.py [--layouts ucf,stage3] [--size L] [--peak-tflops 989]
    python benchmarks/bench_ar_train_step.py --layouts stage3 --flex-kernel flash   # needs the 'flash' extra
    python benchmarks/bench_ar_train_step.py --device cpu --size tiny --layouts ucf --iters 1   # smoke
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS, attended_pairs, attention_flops, row, time_ms  # noqa: E402
from tokenizer.quantizer import MultiScaleBSQ  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_common.distributed import init_distributed, shutdown_distributed  # noqa: E402
from videoar_megatron.model.attention import VideoARCoreAttention  # noqa: E402
from videoar_megatron.model.config import ModelConfig, ParallelConfig  # noqa: E402
from videoar_megatron.model.layer_spec import transformer_config  # noqa: E402
from videoar_megatron.model.loss import bit_loss  # noqa: E402
from videoar_megatron.model.mask import dense_mask  # noqa: E402
from videoar_megatron.model.model import build_model  # noqa: E402
from videoar_megatron.model.params import layer_parameters  # noqa: E402
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel  # noqa: E402
from videoar_megatron.model.sequence import build_batch  # noqa: E402

GPT_VOCAB = 64


class CausalSDPACoreAttention(VideoARCoreAttention):
    """The GPT baseline's core attention: plain causal SDPA (flash attention on CUDA)."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.softmax_scale,
                                             enable_gqa=self.kv_heads != self.heads)
        return out.permute(2, 0, 1, 3).reshape(query.shape[0], query.shape[1], -1)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="ucf,stage3", help="comma list of: " + ", ".join(LAYOUTS))
    p.add_argument("--size", default="L", help="named VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--batch", default="ucf=16,stage3=1", help="samples per step per layout")
    p.add_argument("--latent-dim", type=int, default=48, help="bits per token d (paper 48)")
    p.add_argument("--p-mask", type=float, default=0.0, help="Random Frame Mask drop probability")
    p.add_argument("--recompute", default="none", choices=["none", "full", "core_attn"], help="activation recompute")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--split-tokens", default="",
                   help="comma list of ModelConfig.attention_split_tokens values to time (default: the config's)")
    p.add_argument("--flex-kernel", default="triton", choices=["triton", "flash"],
                   help="ModelConfig.flex_kernel: FlexAttention's Triton kernels or its FlashAttention-4 backend")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script only")
    return p.parse_args(argv)


def videoar_config(args, layout, split_tokens: int | None = None) -> ModelConfig:
    split = {} if split_tokens is None else {"attention_split_tokens": split_tokens}
    return build_dataclass(ModelConfig, {
        "size": args.size, "latent_dim": args.latent_dim, "max_scales": max(16, layout.num_scales),
        "condition": {"kind": "text_features", "text_len": layout.prefix_len, "feature_dim": 1024},
        "mask": {"rfm_window": 0, "rfm_p_mask": args.p_mask}, "flex_kernel": args.flex_kernel, **split})


def matmul_params(cfg: ModelConfig, head_width: int) -> int:
    """Weights every token multiplies through (norms excluded; embeddings looked up, not multiplied)."""
    norms = 2 * cfg.hidden_size
    return cfg.num_layers * (layer_parameters(cfg) - norms) + cfg.hidden_size * head_width


def videoar_step(args, layout, batch_size, groups, device, split_tokens=None):
    cfg = videoar_config(args, layout, split_tokens)
    parallel = ParallelConfig(recompute=args.recompute)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, parallel, groups, device=device, params_dtype=dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    H, W = layout.scales[-1]
    q = MultiScaleBSQ(dim=cfg.latent_dim, scales=layout.scales)
    latent = torch.randn(batch_size, cfg.latent_dim, layout.frames, H, W, device=device)
    feats = torch.randn(batch_size, layout.prefix_len, 1024, device=device, dtype=dtype)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        batch = build_batch(q, cfg, latent_BdTHW=latent, cond=feats, training=True, generator=gen)
        bit_loss(model(batch), batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    sample = build_batch(q, cfg, latent_BdTHW=latent[:1], cond=feats[:1], training=True, generator=gen)
    pairs = attended_pairs(dense_mask(sample.layout.tables(device), sample.frame_visible_BTT,
                                      sample.text_len_B)) if layout.seq_len <= 20000 else float("nan")
    ms = time_ms(step, device, args.iters)
    del model, opt
    return ms, cfg, pairs


def gpt_step(args, cfg, layout, batch_size, groups, device):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tconfig = transformer_config(cfg, ParallelConfig(recompute=args.recompute), device=device, params_dtype=dtype)
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = CausalSDPACoreAttention
    rope = "rope" if device.type == "cuda" else "none"  # Megatron's RotaryEmbedding assumes CUDA
    with torch.device(device):
        model = GPTModel(tconfig, spec, vocab_size=GPT_VOCAB, max_sequence_length=layout.seq_len,
                         position_embedding_type=rope, pg_collection=groups).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    S = layout.seq_len
    tokens = torch.randint(0, GPT_VOCAB, (batch_size, S), device=device)
    labels = torch.randint(0, GPT_VOCAB, (batch_size, S), device=device)
    positions = torch.arange(S, device=device)[None].expand(batch_size, S)

    def step():
        model(tokens, positions, None, labels=labels).float().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    ms = time_ms(step, device, args.iters)
    del model, opt
    return ms


def report(name, layout, batch_size, cfg, pairs, ours_ms, gpt_ms, peak):
    tokens = batch_size * layout.seq_len
    causal_pairs = layout.seq_len * (layout.seq_len + 1) / 2
    attn = lambda p: cfg.num_layers * attention_flops(p, cfg.num_attention_heads, cfg.head_dim) * batch_size  # noqa: E731
    ours_flops = 6 * matmul_params(cfg, cfg.latent_dim) * batch_size * layout.video_len + attn(pairs)
    gpt_flops = 6 * matmul_params(cfg, GPT_VOCAB) * tokens + attn(causal_pairs)
    mfu = lambda flops, ms: flops / (ms * 1e-3) / (peak * 1e12)  # noqa: E731
    print(f"\n[{name}] {cfg.size}: {cfg.num_layers} x {cfg.hidden_size} x {cfg.num_attention_heads}, "
          f"flex_kernel={cfg.flex_kernel}, attention_split_tokens={cfg.attention_split_tokens}, "
          f"S={layout.seq_len}, batch {batch_size} ({tokens} tokens/step), VideoAR mask density "
          f"{pairs / layout.seq_len ** 2:.3f} vs causal {causal_pairs / layout.seq_len ** 2:.3f}")
    print(row("step time", ours_ms, gpt_ms))
    print(row("tokens/s", tokens / ours_ms * 1e3, tokens / gpt_ms * 1e3, "tok/s", lower_is_better=False))
    print(row("MFU (useful FLOPs)", mfu(ours_flops, ours_ms), mfu(gpt_flops, gpt_ms), "", lower_is_better=False))
    ratio = gpt_ms / ours_ms
    print(f"  => VideoAR / GPT tokens/s = {ratio:.3f} (goal >= 0.9: {'met' if ratio >= 0.9 else 'NOT met'})")


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ar_train_step needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    ctx = init_distributed(device=args.device)
    try:
        groups = init_model_parallel(ctx, ParallelConfig())
        batches = dict(item.split("=") for item in args.batch.split(","))
        name_dev = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        print(f"device: {name_dev}, torch {torch.__version__}, peak {args.peak_tflops} TFLOP/s for MFU")
        for name in args.layouts.split(","):
            layout, batch_size = LAYOUTS[name], int(batches.get(name, 1))
            # The baseline first, then each VideoAR variant reported as soon as it is measured (a run cut
            # short by a time limit still prints what it finished).
            gpt_ms = gpt_step(args, videoar_config(args, layout), layout, batch_size, groups, ctx.device)
            print(f"[{name}] GPT baseline step {gpt_ms:.1f} ms", flush=True)
            for split in [int(x) for x in args.split_tokens.split(",") if x] or [None]:
                torch.cuda.empty_cache() if ctx.device.type == "cuda" else None
                ours_ms, cfg, pairs = videoar_step(args, layout, batch_size, groups, ctx.device, split)
                report(name, layout, batch_size, cfg, pairs, ours_ms, gpt_ms, args.peak_tflops)
                sys.stdout.flush()
        destroy_model_parallel(ctx)
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
