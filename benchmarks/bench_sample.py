"""Seconds per generated video: VideoAR-L, UCF-101 shape (17 frames at 128², 5 latent frames x 6 scales
= 30 steps), tokenizer decode included, KV-cached decoding next to recomputing the prefix every step.

Random weights (timing does not depend on them). Per batch size (default 1 and 32), three engines on
the same model, the same tokenizer and the same samples, all in this process:

- ``graph``: KV cache, the whole decode captured once as a CUDA graph and replayed (the default);
- ``eager``: KV cache, one eager forward per (frame, scale) step;
- ``recompute``: no cache, every step runs the whole prefix again (the baseline).

Guidance uses the UCF-101 schedule, so every step runs 2B rows (conditional + unconditional), as the
paper's 0.86 s/video (VideoAR-L, 30 steps) does. Printed: seconds per video (end to end, and its AR
and tokenizer-decode parts), the ratio to the recompute baseline and to the paper, the two goals
(<= 0.43 s/video at batch 1; cache >= 5x faster than recompute) and sanity checks (graph bits equal
eager bits; cached bits agree with recompute bits).

    python benchmarks/bench_sample.py                         # H100/H200: L, batches 1 and 32
    python benchmarks/bench_sample.py --json bench_sample.json
    python benchmarks/bench_sample.py --device cpu --size tiny --latent-dim 8 --tok-channels 8 \\
        --batches 1,2 --iters 1 --recompute-iters 1           # smoke test of the script
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import one_process_groups  # noqa: E402
from tokenizer.config import TokenizerModelConfig  # noqa: E402
from tokenizer.model import VideoTokenizer  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.model.config import ModelConfig, ParallelConfig  # noqa: E402
from videoar_megatron.model.model import build_model  # noqa: E402
from videoar_megatron.sampling.config import SamplingConfig  # noqa: E402
from videoar_megatron.sampling.extend import decode_latent, generate_videos, window_keys  # noqa: E402
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler  # noqa: E402

PAPER_S_PER_VIDEO = 0.86
GOAL_S_PER_VIDEO = 0.43
GOAL_CACHE_SPEEDUP = 5.0
ENGINES = {"graph": {"kv_cache": True, "cuda_graph": True}, "eager": {"kv_cache": True, "cuda_graph": False},
           "recompute": {"kv_cache": False, "cuda_graph": False}}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="L", help="named VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--batches", default="1,32", help="videos per call, comma list")
    p.add_argument("--engines", default="graph,eager,recompute", help="comma list of: " + ", ".join(ENGINES))
    p.add_argument("--latent-dim", type=int, default=48, help="bits per token d (paper 48)")
    p.add_argument("--scales", default="1,2,3,4,6,8", help="square scale schedule (last = latent grid)")
    p.add_argument("--latent-frames", type=int, default=5, help="latent frames per video (5 = 17 frames)")
    p.add_argument("--tok-channels", type=int, default=128, help="tokenizer base channels (MAGVIT-v2: 128)")
    p.add_argument("--iters", type=int, default=5, help="timed calls per (engine, batch) after one warm-up")
    p.add_argument("--recompute-iters", type=int, default=2, help="timed calls of the slow recompute engine")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, iters: int) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``iters`` calls (host clock around synchronised calls: a video's
    latency includes every host-side cost)."""
    times, out = [], None
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def build(args, ctx, groups):
    scales = [(int(s), int(s)) for s in args.scales.split(",")]
    dtype = getattr(torch, args.dtype)
    cfg = build_dataclass(ModelConfig, {"size": args.size, "latent_dim": args.latent_dim,
                                        "condition": {"kind": "class", "num_classes": 101}})
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, device=ctx.device, params_dtype=dtype).eval()
    tok_cfg = TokenizerModelConfig(latent_dim=args.latent_dim, base_channels=args.tok_channels,
                                   channel_mult=[1, 2, 2, 4, 4], norm_groups=min(32, args.tok_channels // 2),
                                   scale_schedule=[list(s) for s in scales])
    tokenizer = VideoTokenizer(tok_cfg).to(ctx.device, dtype).eval()
    return model, cfg, tokenizer, tokenizer.quantizer_for(scales)


def run_engine(name, args, model, cfg, tokenizer, quantizer, B, device) -> dict:
    sampling = build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}, "top_p": 0.97,
                                                **ENGINES[name]})
    sampler = VideoARSampler(model, quantizer, cfg, sampling, window_frames=args.latent_frames)
    cond = Conditions.labels(torch.arange(B) % 101)
    ids = list(range(B))
    frames = 1 + tokenizer.cfg.temporal_factor * (args.latent_frames - 1)
    iters = args.recompute_iters if name == "recompute" else args.iters
    sync(device)
    t0 = time.perf_counter()
    first = sampler.generate(cond, window_keys(0, ids, 0))          # warm-up (graph capture for 'graph')
    sync(device)
    warmup_s = time.perf_counter() - t0
    ar_s, out = timed(lambda: sampler.generate(cond, window_keys(0, ids, 0)), device, iters)
    decode_latent(tokenizer, out.latent_BdTHW)                      # warm-up (cuDNN autotuning)
    dec_s, _ = timed(lambda: decode_latent(tokenizer, out.latent_BdTHW), device, iters)
    total_s, video = timed(lambda: generate_videos(sampler, tokenizer, cond, ids, seed=0, frames=frames), device,
                           iters)
    plan = next(iter(sampler._plans.values()))
    return {"engine": name, "batch": B, "s_per_video": total_s / B, "ar_s_per_video": ar_s / B,
            "decode_s_per_video": dec_s / B, "first_call_s": warmup_s, "iters": iters,
            "graph_captured": plan.graph is not None, "graph_error": plan.graph_error,
            "video_shape": list(video.shape), "bits": out.bits_BTLd.cpu(), "first_bits": first.bits_BTLd.cpu()}


def report(rows: list[dict], device_name: str) -> list[str]:
    lines = [f"VideoAR sampling, {device_name}: seconds per video (17 frames at 128², 30 steps, CFG 2B rows, "
             "tokenizer decode included)",
             f"  {'engine':<10} {'batch':>5} {'s/video':>10} {'AR':>10} {'decode':>10} {'first call':>11} "
             f"{'vs recompute':>13} {'vs paper 0.86 s':>16}",
             "  (AR: decode of the latents alone; decode: tokenizer alone; vs columns: speedup, > 1 = faster)"]
    base = {r["batch"]: r["s_per_video"] for r in rows if r["engine"] == "recompute"}
    for r in rows:
        speed = base.get(r["batch"], float("nan")) / r["s_per_video"]
        note = f"  (graph capture FAILED, ran eagerly: {r['graph_error']})" if r["graph_error"] else ""
        if r["engine"] == "graph" and not r["graph_captured"] and not r["graph_error"]:
            note = "  (no CUDA: eager)"
        lines.append(f"  {r['engine']:<10} {r['batch']:>5} {r['s_per_video']:>10.4f} {r['ar_s_per_video']:>10.4f} "
                     f"{r['decode_s_per_video']:>10.4f} {r['first_call_s']:>10.2f}s {speed:>12.1f}x "
                     f"{PAPER_S_PER_VIDEO / r['s_per_video']:>15.2f}x{note}")
    lines.append("goals:")
    for r in rows:
        if r["engine"] in ("graph", "eager") and r["batch"] == 1:
            ok = r["s_per_video"] <= GOAL_S_PER_VIDEO
            lines.append(f"  {r['engine']} batch 1: {r['s_per_video']:.4f} s/video "
                         f"{'<=' if ok else '>'} {GOAL_S_PER_VIDEO} s  {'PASS' if ok else 'MISS'}")
        if r["engine"] in ("graph", "eager") and r["batch"] in base:
            speed = base[r["batch"]] / r["s_per_video"]
            ok = speed >= GOAL_CACHE_SPEEDUP
            lines.append(f"  {r['engine']} batch {r['batch']}: cache {speed:.1f}x faster than recompute "
                         f"{'>=' if ok else '<'} {GOAL_CACHE_SPEEDUP}x  {'PASS' if ok else 'MISS'}")
    return lines


def checks(rows: list[dict]) -> list[str]:
    lines = ["checks:"]
    by = {(r["engine"], r["batch"]): r for r in rows}
    for (engine, B), r in sorted(by.items()):
        if engine == "graph" and ("eager", B) in by:
            same = torch.equal(r["bits"], by[("eager", B)]["bits"])
            lines.append(f"  batch {B}: graph bits == eager bits: {same}")
        if engine == "eager" and ("recompute", B) in by:
            agree = (r["bits"] == by[("recompute", B)]["bits"]).float().mean().item()
            lines.append(f"  batch {B}: cached vs recompute bit agreement {agree:.4f} (1.0 in fp32; in bf16 the "
                         "two differ in rounding, and one flipped bit changes everything after it)")
        lines.append(f"  batch {B} {engine}: warm-up == timed call (same keys): "
                     f"{torch.equal(r['bits'], r['first_bits'])}")
    return lines


def main(argv=None) -> int:
    args = parse(argv)
    with one_process_groups(args.device) as (ctx, groups):
        if ctx.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model, cfg, tokenizer, quantizer = build(args, ctx, groups)
        device_name = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        rows = []
        for B in (int(b) for b in args.batches.split(",")):
            for name in args.engines.split(","):
                rows.append(run_engine(name, args, model, cfg, tokenizer, quantizer, B, ctx.device))
                print(f"  done: {name} batch {B}: {rows[-1]['s_per_video']:.4f} s/video", flush=True)
        text = report(rows, device_name) + checks(rows)
        if ctx.device.type == "cuda":
            text.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        print("\n".join(text))
        if args.json:
            plain = [{k: v for k, v in r.items() if k not in ("bits", "first_bits")} for r in rows]
            Path(args.json).write_text(json.dumps({"device": device_name, "args": vars(args), "rows": plain,
                                                   "report": text}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
