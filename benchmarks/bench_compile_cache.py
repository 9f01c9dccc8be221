"""Time to the first training step with a cold and with a warm compile cache, in the same run.

Two child processes run the same thing one after the other, sharing one compile cache directory that
starts empty (``videoar_common.compile_cache``, as the trainer sets it before anything compiles):
build VideoAR-<size> at a recipe layout (benchmarks/ar_common.py), run its first training step (the
BlockMask build, FlexAttention forward and backward and everything else torch.compile'd compiles here),
then a few more. The first child compiles and fills the cache (a fresh host, or a job whose cache was
lost); the second finds it (a requeued job, or another node on a shared path). Printed per child: the
time from its launch to the end of its first step, the first step alone, the steady step time, and
Inductor's FX graph / AOTAutograd cache hits and misses; then cold / warm of the time to the first step.

    python benchmarks/bench_compile_cache.py [--size L] [--layout stage3] [--cache-dir DIR]
    python benchmarks/bench_compile_cache.py --device cpu --size tiny --layout ucf --steps 1   # smoke
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="L", help="named VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--layout", default="stage3", help="benchmark layout (benchmarks/ar_common.py LAYOUTS)")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--recompute", default="none", choices=["none", "full", "core_attn"], help="activation recompute")
    p.add_argument("--flex-kernel", default="auto", choices=["auto", "triton", "flash"], help="ModelConfig.flex_kernel")
    p.add_argument("--steps", type=int, default=3, help="steps after the first (their median is the steady step)")
    p.add_argument("--cache-dir", default="",
                   help="compile cache shared by the two runs; must be empty or absent (default: a fresh temporary "
                        "directory, removed afterwards). A given one is kept, for later runs to use warm")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script only")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def child(args) -> dict:
    """One run: what the trainer does up to its first steps, timed (printed as one JSON line)."""
    from videoar_common.compile_cache import CompileConfig, configure_compile_cache
    cache = configure_compile_cache(CompileConfig(cache_dir=args.cache_dir), REPO)  # before anything compiles
    import statistics

    import torch
    from torch._dynamo.utils import counters

    from benchmarks.ar_common import LAYOUTS, one_process_groups
    from benchmarks.bench_ar_train_step import videoar_config
    from tokenizer.quantizer import MultiScaleBSQ
    from videoar_megatron.model.config import ParallelConfig
    from videoar_megatron.model.loss import bit_loss
    from videoar_megatron.model.model import build_model
    from videoar_megatron.model.sequence import build_batch

    with one_process_groups(args.device) as (ctx, groups):
        device, layout = ctx.device, LAYOUTS[args.layout]
        settings = argparse.Namespace(latent_dim=48, p_mask=None, flex_kernel=args.flex_kernel)
        cfg = videoar_config(settings, args.size, args.layout)   # the recipe's mask, as it trains
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = build_model(cfg, ParallelConfig(recompute=args.recompute), groups, device=device, params_dtype=dtype)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
        H, W = layout.scales[-1]
        quantizer = MultiScaleBSQ(dim=cfg.latent_dim, scales=layout.scales)
        latent = torch.randn(args.batch, cfg.latent_dim, layout.frames, H, W, device=device)
        feats = torch.randn(args.batch, layout.prefix_len, 1024, device=device, dtype=dtype)
        gen = torch.Generator(device).manual_seed(0)

        def step() -> float:
            t0 = time.perf_counter()
            batch = build_batch(quantizer, cfg, latent_BdTHW=latent, cond=feats, training=True, generator=gen)
            bit_loss(model(batch), batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize() if device.type == "cuda" else None
            return time.perf_counter() - t0

        first_s = step()
        to_first_step_s = time.time() - args.launched
        steady = [step() for _ in range(args.steps)]
    return {"time_to_first_step_s": to_first_step_s, "first_step_s": first_s,
            "steady_step_ms": statistics.median(steady) * 1e3 if steady else float("nan"),
            "cache_was_warm": cache.warm, "cache": str(cache.path),
            "kernel": model.flex_kernel_for(layout.seq_len).name if device.type == "cuda" else "sdpa (cpu)",
            "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
            "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
            "autograd_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "autograd_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def run_child(argv: list[str], cache_dir: Path) -> dict:
    launched = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--child", "--cache-dir", str(cache_dir),
           "--launched", repr(launched)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child run failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["process_s"] = time.time() - launched
    return result


def describe(label: str, r: dict) -> str:
    return (f"  {label}: time to first step {r['time_to_first_step_s']:7.1f} s from launch (first step "
            f"{r['first_step_s']:6.1f} s; process {r['process_s']:6.1f} s), steady step {r['steady_step_ms']:8.1f} ms, "
            f"cache {'warm' if r['cache_was_warm'] else 'empty'} at start; FX graph cache {r['fxgraph_hit']} hits / "
            f"{r['fxgraph_miss']} misses, AOTAutograd cache {r['autograd_hit']} / {r['autograd_miss']}")


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            print("bench_compile_cache needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
            return 2
    cache = Path(args.cache_dir) if args.cache_dir else Path(tempfile.mkdtemp(prefix="videoar-compile-cache-"))
    if cache.exists() and any(cache.iterdir()):
        print(f"--cache-dir {cache} is not empty: the first run would not be cold", file=sys.stderr)
        return 2
    own = ["--size", args.size, "--layout", args.layout, "--batch", str(args.batch), "--recompute", args.recompute,
           "--flex-kernel", args.flex_kernel, "--steps", str(args.steps), "--device", args.device]
    print(f"compile cache (cold, then warm): {cache}; VideoAR-{args.size} at {args.layout}, batch {args.batch}, "
          f"recompute {args.recompute}, flex_kernel {args.flex_kernel}, device {args.device}", flush=True)
    try:
        cold = run_child(own, cache)
        print(describe("cold", cold), flush=True)
        warm = run_child(own, cache)
        print(describe("warm", warm), flush=True)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    ratio = cold["time_to_first_step_s"] / warm["time_to_first_step_s"]
    print(f"  kernel: {cold['kernel']}\n  => time to first step, cold / warm = {ratio:.2f} "
          f"({cold['time_to_first_step_s']:.1f} s -> {warm['time_to_first_step_s']:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
