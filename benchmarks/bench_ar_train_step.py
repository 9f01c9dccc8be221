"""Full training step of VideoAR next to a Megatron GPTModel of the same dimensions (causal attention).

Both models: the named size (L: 24 layers x 1536 x 12 heads, XL: 32 x 2048 x 16, 4B: 36 x 2560 x 32),
SwiGLU FFN 4h, RMSNorm, no biases, bf16 parameters, Megatron column/row-parallel linears (TP=1), fused
AdamW, same tokens per step, same activation recompute. Differences are exactly what VideoAR adds: the
sequence builder on the GPU (error-correction requantization, RFM draw), the per-step BlockMask build,
FlexAttention under the VideoAR mask (kernel from ``model.flex_kernel``, ``auto`` by default, printed with
its reason; vs causal SDPA/flash for GPT), 3-D RoPE angles (vs Megatron's 1-D RoPE) and the bit head (vs
a 64-word LM head).

Layouts are the shipped recipes' (benchmarks/ar_common.py): ucf, stage1, stage2, stage3 (23,059 tokens),
stage3_65f (43,499). Printed per (size, layout): step time, tokens/s and MFU (useful FLOPs: 6·matmul
params·tokens + attention over the pairs the mask lets through, counted in closed form; backward = 2 x
forward; recompute not credited) for both models, with the ratio VideoAR / GPT (goal >= 1.0), then a
summary line per pair. Sizes and layouts run in one process (layout by layout), so compiled kernels
are shared and a run cut short has its first layout at every size.

    python benchmarks/bench_ar_train_step.py [--size L,XL,4B] [--layouts ucf,stage3] [--peak-tflops 989]
    python benchmarks/bench_ar_train_step.py --size 4B --layouts stage3,stage3_65f --recompute full
    python benchmarks/bench_ar_train_step.py --size L,XL,4B --layouts stage3 --recompute XL=full,4B=full
    python benchmarks/bench_ar_train_step.py --device cpu --size tiny --layouts ucf --iters 1   # smoke
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import (LAYOUTS, MASKS, attention_flops, layout_origin, one_process_groups,  # noqa: E402
                                   row, time_ms)
from tokenizer.quantizer import MultiScaleBSQ  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.model.attention import VideoARCoreAttention  # noqa: E402
from videoar_megatron.model.config import ModelConfig, ParallelConfig  # noqa: E402
from videoar_megatron.model.layer_spec import transformer_config  # noqa: E402
from videoar_megatron.model.loss import bit_loss  # noqa: E402
from videoar_megatron.model.model import build_model  # noqa: E402
from videoar_megatron.model.params import layer_parameters  # noqa: E402
from videoar_megatron.model.sequence import build_batch  # noqa: E402
from videoar_megatron.training.metrics import attended_pairs  # noqa: E402

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
    p.add_argument("--size", default="L", help="comma list of named VideoAR sizes (tiny, L, XL, 4B)")
    p.add_argument("--batch", default="ucf=16",
                   help="samples per step: one number, or per size/layout, layout or size (others 1), e.g. ucf=16")
    p.add_argument("--latent-dim", type=int, default=48, help="bits per token d (paper 48)")
    p.add_argument("--p-mask", type=float, default=None,
                   help="Random Frame Mask drop probability with no window (default: each recipe's model.mask, "
                        "window and drop, as it trains; stages I-III and 65 frames read the frame table, so auto "
                        "picks Triton there: docs/training.md#attention-kernels)")
    p.add_argument("--recompute", default="none",
                   help="activation recompute (none, full, core_attn): one value, or per size/layout, layout or "
                        "size (others none), e.g. XL=full,4B=full,stage3_65f=full")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200 SXM: 989)")
    p.add_argument("--iters", type=int, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens in the first)")
    p.add_argument("--split-tokens", default="",
                   help="comma list of ModelConfig.attention_split_tokens values to time (default: the config's)")
    p.add_argument("--flex-kernel", default="auto", choices=["auto", "triton", "flash"],
                   help="ModelConfig.flex_kernel: auto (the default: FlashAttention-4 where it can run and wins), "
                        "Triton kernels, or the FlashAttention-4 backend")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script only")
    return p.parse_args(argv)


def per_pair(value: str, size: str, name: str, default: str) -> str:
    """``value`` is one setting for everything, or ``key=setting,...`` where a key is ``size/layout``, a
    layout or a size, looked up in that order (nothing found: ``default``)."""
    if "=" not in value:
        return value
    table = dict(item.split("=") for item in value.split(","))
    return next((table[k] for k in (f"{size}/{name}", name, size) if k in table), default)


def videoar_config(args, size: str, name: str, split_tokens: int | None = None) -> ModelConfig:
    """VideoAR-``size`` at benchmark layout ``name``, with the Random Frame Mask of its recipe unless
    ``args.p_mask`` sets a drop (no window)."""
    layout = LAYOUTS[name]
    split = {} if split_tokens is None else {"attention_split_tokens": split_tokens}
    mask = MASKS[name] if args.p_mask is None else {"rfm_window": 0, "rfm_p_mask": args.p_mask}
    return build_dataclass(ModelConfig, {
        "size": size, "latent_dim": args.latent_dim, "max_scales": max(16, layout.num_scales),
        "condition": {"kind": "text_features", "text_len": layout.prefix_len, "feature_dim": 1024},
        "mask": mask, "flex_kernel": args.flex_kernel, **split})


def matmul_params(cfg: ModelConfig, head_width: int) -> int:
    """Weights every token multiplies through (norms excluded; embeddings looked up, not multiplied)."""
    norms = 2 * cfg.hidden_size
    return cfg.num_layers * (layer_parameters(cfg) - norms) + cfg.hidden_size * head_width


def videoar_step(args, size, name, batch_size, groups, device, recompute, split_tokens=None):
    """(median step ms, config, attended pairs per sample, the flex kernel chosen) of VideoAR."""
    layout = LAYOUTS[name]
    cfg = videoar_config(args, size, name, split_tokens)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, ParallelConfig(recompute=recompute), groups, device=device, params_dtype=dtype)
    kernel = model.flex_kernel_for(layout.seq_len)
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

    ms = time_ms(step, device, args.iters, args.warmup)
    del model, opt
    return ms, cfg, attended_pairs(layout, cfg.mask.rfm_window, cfg.mask.rfm_p_mask, cfg.mask.rfm_anchor_first), kernel


def gpt_step(args, cfg, layout, batch_size, groups, device, recompute):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tconfig = transformer_config(cfg, ParallelConfig(recompute=recompute), device=device, params_dtype=dtype)
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

    ms = time_ms(step, device, args.iters, args.warmup)
    del model, opt
    return ms


def report(name, layout, batch_size, cfg, pairs, kernel, recompute, ours_ms, gpt_ms, peak) -> str:
    """Print the comparison of one (size, layout); returns its summary line."""
    tokens = batch_size * layout.seq_len
    causal_pairs = layout.seq_len * (layout.seq_len + 1) / 2
    attn = lambda p: cfg.num_layers * attention_flops(p, cfg.num_attention_heads, cfg.head_dim) * batch_size  # noqa: E731
    ours_flops = 6 * matmul_params(cfg, cfg.latent_dim) * batch_size * layout.video_len + attn(pairs)
    gpt_flops = 6 * matmul_params(cfg, GPT_VOCAB) * tokens + attn(causal_pairs)
    mfu = lambda flops, ms: flops / (ms * 1e-3) / (peak * 1e12)  # noqa: E731
    print(f"\n[{name}] {cfg.size}: {cfg.num_layers} x {cfg.hidden_size} x {cfg.num_attention_heads} "
          f"(head_dim {cfg.head_dim}), S={layout.seq_len} from {layout_origin(name)}, batch {batch_size} "
          f"({tokens} tokens/step), recompute {recompute}, attention_split_tokens={cfg.attention_split_tokens}, "
          f"Random Frame Mask window {cfg.mask.rfm_window} drop {cfg.mask.rfm_p_mask}, "
          f"VideoAR mask density {pairs / layout.seq_len ** 2:.3f} vs causal {causal_pairs / layout.seq_len ** 2:.3f}")
    print(f"  flex kernel: {kernel.name} ({kernel.reason})")
    print(row("step time", ours_ms, gpt_ms))
    print(row("tokens/s", tokens / ours_ms * 1e3, tokens / gpt_ms * 1e3, "tok/s", lower_is_better=False))
    print(row("MFU (useful FLOPs)", mfu(ours_flops, ours_ms), mfu(gpt_flops, gpt_ms), "", lower_is_better=False))
    ratio = gpt_ms / ours_ms
    print(f"  => VideoAR / GPT tokens/s = {ratio:.3f} (goal >= 1.0: {'met' if ratio >= 1.0 else 'NOT met'})")
    split = f" split={cfg.attention_split_tokens}" if cfg.attention_split_tokens else ""
    return (f"{cfg.size:>4} {name:<10} S={layout.seq_len:>6} {kernel.name:<6}{split} recompute={recompute:<9} "
            f"VideoAR {tokens / ours_ms * 1e3:>9.0f} tok/s ({ours_ms:8.1f} ms)  GPT {tokens / gpt_ms * 1e3:>9.0f} "
            f"tok/s ({gpt_ms:8.1f} ms)  ratio {ratio:.3f}  MFU {mfu(ours_flops, ours_ms):.3f} / "
            f"{mfu(gpt_flops, gpt_ms):.3f}")


def run_pair(args, size, name, groups, device) -> list[str]:
    """GPT, then each VideoAR variant of one (size, layout), each reported as soon as it is measured (a
    run cut short by a time limit still prints what it finished)."""
    layout = LAYOUTS[name]
    batch_size = int(per_pair(args.batch, size, name, "1"))
    recompute = per_pair(args.recompute, size, name, "none")
    gpt_ms = gpt_step(args, videoar_config(args, size, name), layout, batch_size, groups, device, recompute)
    print(f"[{name}] {size}: GPT baseline step {gpt_ms:.1f} ms", flush=True)
    lines = []
    for split in [int(x) for x in args.split_tokens.split(",") if x] or [None]:
        torch.cuda.empty_cache() if device.type == "cuda" else None
        ours_ms, cfg, pairs, kernel = videoar_step(args, size, name, batch_size, groups, device, recompute, split)
        lines.append(report(name, layout, batch_size, cfg, pairs, kernel, recompute, ours_ms, gpt_ms,
                            args.peak_tflops))
        sys.stdout.flush()
    torch.cuda.empty_cache() if device.type == "cuda" else None
    return lines


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ar_train_step needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    with one_process_groups(args.device) as (ctx, groups):
        name_dev = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        print(f"device: {name_dev}, torch {torch.__version__}, peak {args.peak_tflops} TFLOP/s for MFU")
        summary = []
        # Layout by layout, every size at each: a run cut short has the first length at all sizes.
        for name in args.layouts.split(","):
            for size in args.size.split(","):
                try:
                    summary += run_pair(args, size, name, groups, ctx.device)
                except torch.OutOfMemoryError as e:  # the next pair may still fit: report and go on
                    summary.append(f"{size:>4} {name:<10} out of GPU memory (try --recompute {name}=full): "
                                   f"{str(e).splitlines()[0]}")
                    print(f"[{name}] {size}: {summary[-1]}", flush=True)
                    gc.collect()
                    torch.cuda.empty_cache()
        print("\nsummary (VideoAR / GPT tokens/s, goal >= 1.0; MFU VideoAR / GPT):", *summary, sep="\n  ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
