"""Attention forward+backward under the VideoAR mask: FlexAttention vs dense-mask SDPA vs causal SDPA.

One run, the recipes' lengths (benchmarks/ar_common.py: ucf 651 tokens, stage1 2,669, stage2 12,839, stage3
23,059, stage3_65f 43,499; default ucf and stage3). Every figure is
printed next to the baseline measured in the same run (causal SDPA, i.e. flash attention on a plain
causal mask of the same length) with the ratio; FlexAttention is also compared with dense-mask SDPA
(the CPU path's kernel), and the per-step cost of building the BlockMask is reported (the Random
Frame Mask is drawn per sample, so the block mask is rebuilt every step, once for all layers).
"split >= N" is the model's split attention (``ModelConfig.attention_split_tokens = N``): blocks of at
least N tokens as unmasked SDPA calls, the other queries through Flex (only without a Random Frame Mask).
"FLASH (FA4)" is FlexAttention's FlashAttention-4 backend (``ModelConfig.flex_kernel = flash``), timed
when flash-attn-4 is installed, through the model's attention path (heads zero-padded to 128 where
Hopper needs it: ``--heads 32 --head-dim 80`` is VideoAR-4B).

    python benchmarks/bench_ar_attention.py [--layouts ucf,stage3] [--p-mask 0.0] [--window 0]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS, attended_pairs, attention_flops, cuda_time_ms, row  # noqa: E402
from videoar_megatron.model.attention import (FLEX_KERNEL_OPTIONS, AttentionInputs, check_flex_kernel,  # noqa: E402
                                              choose_flex_kernel, split_plan, videoar_attention)
from videoar_megatron.model.mask import (block_mask, compiled_flex_attention, dense_mask,  # noqa: E402
                                         draw_frame_visibility, is_full_context)


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="ucf,stage3", help="comma list of: " + ", ".join(LAYOUTS))
    p.add_argument("--heads", type=int, default=12, help="attention heads (VideoAR-L: 12)")
    p.add_argument("--head-dim", type=int, default=128, help="head dim (VideoAR-L: 1536/12 = 128)")
    p.add_argument("--batch", default="ucf=16,stage3=1", help="samples per layout, e.g. ucf=16,stage3=1")
    p.add_argument("--window", type=int, default=0, help="Random Frame Mask window (0 = unlimited)")
    p.add_argument("--p-mask", type=float, default=0.0, help="Random Frame Mask drop probability")
    p.add_argument("--iters", type=int, default=20, help="timed iterations (median reported)")
    p.add_argument("--split-tokens", default="1000,250,128",
                   help="split attention thresholds to time (comma list; blocks of at least N tokens unmasked)")
    return p.parse_args(argv)


def flash_available(head_dim: int) -> bool:
    """FlexAttention's FlashAttention-4 backend (model.flex_kernel=flash) can run here; else its rows
    are left out, with the reason printed."""
    try:
        check_flex_kernel("flash", torch.device("cuda"), head_dim)
        return True
    except ValueError as e:
        print(f"(no FLASH rows: {e})")
        return False


def fwd_bwd(attn, q, k, v, grad):
    def step():
        out = attn(q, k, v)
        torch.autograd.grad(out, (q, k, v), grad)
    return step


def bench_layout(name: str, batch: int, args) -> None:
    layout = LAYOUTS[name]
    S, H, D = layout.seq_len, args.heads, args.head_dim
    tables = layout.tables("cuda")
    vis = draw_frame_visibility(batch, layout.frames, window=args.window, p_mask=args.p_mask,
                                generator=torch.Generator().manual_seed(0), device="cuda")
    text_len = torch.full((batch,), layout.prefix_len, device="cuda")
    q, k, v, grad = (torch.randn(batch, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k, v = (x.requires_grad_() for x in (q, k, v))

    build_ms = cuda_time_ms(lambda: block_mask(tables, vis, text_len), iters=args.iters)
    bm = block_mask(tables, vis, text_len)
    dense = dense_mask(tables, vis, text_len)
    flex = compiled_flex_attention()
    times = {
        "causal SDPA (baseline)": fwd_bwd(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                          q, k, v, grad),
        "FlexAttention, VideoAR mask": fwd_bwd(
            lambda a, b, c: flex(a, b, c, block_mask=bm, kernel_options=FLEX_KERNEL_OPTIONS["triton"]), q, k, v, grad),
        "dense-mask SDPA, VideoAR mask": fwd_bwd(
            lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=dense), q, k, v, grad),
    }
    scale = D ** -0.5
    if args.flash:
        kernel = choose_flex_kernel("flash", S, D, torch.cuda.get_device_capability(), None)
        flash = AttentionInputs(block_mask=bm, flex_kernel=kernel)
        padded = f", heads padded to {kernel.pad_head_dim}" if kernel.pad_head_dim else ""
        times[f"FlexAttention FLASH (FA4){padded}, VideoAR mask"] = fwd_bwd(
            lambda a, b, c: videoar_attention(a, b, c, flash, scale), q, k, v, grad)
    split_build = {}
    for n in (int(x) for x in args.split_tokens.split(",") if x) if is_full_context(vis) else ():
        plan = split_plan(layout, n, "cuda")
        if plan is None:
            continue

        def split_inputs(plan=plan):
            return AttentionInputs(split=plan, block_mask=block_mask(tables, vis, text_len, full_context=True,
                                                                     q_positions=plan.rest_S))
        inputs = split_inputs()
        label = f"split >= {n} ({len(plan.blocks)} SDPA, {len(plan.rest_S)} Flex q)"
        times[label] = fwd_bwd(lambda a, b, c, i=inputs: videoar_attention(a, b, c, i, scale), q, k, v, grad)
        split_build[label] = split_inputs
    pairs = attended_pairs(dense)
    causal_pairs = S * (S + 1) / 2
    print(f"\n[{name}] S={S} tokens ({layout.video_len} video + {layout.prefix_len} prefix + {layout.pad} pad), "
          f"batch {batch}, {H} heads x {D}, bf16, RFM window={args.window} p_mask={args.p_mask}")
    print(f"  mask density {pairs / S ** 2:.3f} (causal {causal_pairs / S ** 2:.3f}); "
          f"BlockMask sparsity {bm.sparsity():.1f}%", flush=True)
    # Each row prints as soon as it is measured (with its wall time, compilation included), so a run cut
    # short by a time limit still reports what it finished.
    ms = {}
    for label, fn in times.items():
        t0 = time.perf_counter()
        ms[label] = t = cuda_time_ms(fn, iters=args.iters)
        base = ms["causal SDPA (baseline)"]
        useful = causal_pairs if label.startswith("causal") else pairs
        tflops = attention_flops(useful, H, D) * batch / (t * 1e-3) / 1e12
        print(row(label, t, base) + f"  [{tflops:6.1f} TFLOP/s useful] ({time.perf_counter() - t0:.0f} s wall)",
              flush=True)
    print(row("FlexAttention vs dense-mask SDPA", ms["FlexAttention, VideoAR mask"],
              ms["dense-mask SDPA, VideoAR mask"]))
    print(row("BlockMask build (per step)", build_ms, base))
    for label, build in split_build.items():
        print(row(f"  mask build, {label.split(' (')[0]}", cuda_time_ms(build, iters=args.iters), base), flush=True)


def main(argv=None) -> int:
    args = parse(argv)
    if not torch.cuda.is_available():
        print("bench_ar_attention needs a CUDA GPU", file=sys.stderr)
        return 2
    batches = dict(item.split("=") for item in args.batch.split(","))
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    args.flash = flash_available(args.head_dim)
    for name in args.layouts.split(","):
        bench_layout(name, int(batches.get(name, 1)), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
