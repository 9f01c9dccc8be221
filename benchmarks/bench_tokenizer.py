"""Tokenizer encode/decode throughput and peak memory, bf16 vs fp32, measured in one run.

Default: the paper-size tokenizer of recipes/tokenizer/base.yaml (d = 48, 128 base channels, 16x spatial,
tau = 4, random weights unless --tokenizer is given) at 17x128x128 and 33x384x672, in fp32 (the baseline)
and bf16, plus chunk-by-chunk encoding/decoding of the large clip (causal streaming: the first chunk has
1 + 4k frames, later chunks 4k). Prints clips/s and peak GiB per row and the bf16/fp32 ratios.

    python benchmarks/bench_tokenizer.py                       # GPU host, the figures for the report
    python benchmarks/bench_tokenizer.py --device cpu --recipe recipes/tokenizer/tiny.yaml \
        --shapes 9x32x32 --iters 2 --warmup 1                  # smoke test on CPU

Note: with --tf32 on (PyTorch's default for cuDNN convolutions) "fp32" convolutions run in TF32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenizer.model import StreamState, VideoTokenizer  # noqa: E402
from tokenizer.train_config import TokenizerTrainConfig  # noqa: E402
from videoar_common.config import load_config  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def parse_shape(text: str) -> tuple[int, int, int]:
    t, h, w = (int(x) for x in text.lower().split("x"))
    return t, h, w


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/tokenizer/base.yaml", help="recipe whose model section is measured")
    p.add_argument("--tokenizer", default=None, help="measure this tokenizer directory instead (trained weights)")
    p.add_argument("--shapes", default="17x128x128,33x384x672", help="comma-separated FxHxW clip shapes")
    p.add_argument("--batch", default="8,1", help="clips per forward for each shape (comma-separated)")
    p.add_argument("--dtypes", default="fp32,bf16", help="first one is the baseline of the ratios")
    p.add_argument("--chunk-frames", type=int, default=8,
                   help="later-chunk length (multiple of tau) for the streaming rows of clips longer than "
                        "1 + chunk; 0 = no streaming rows")
    p.add_argument("--iters", type=int, default=5, help="timed iterations per row")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations per row")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--tf32", action=argparse.BooleanOptionalAction, default=True,
                   help="allow TF32 in fp32 convolutions/matmuls (PyTorch's cuDNN default is on)")
    p.add_argument("--out", default=None, help="also write the rows as JSON here")
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")


def run_stream(step, x_BCTHW: torch.Tensor, chunk: int) -> torch.Tensor:
    """``step(x[:, :, a:b], state)`` (model.encode or model.decode) over chunks of ``chunk`` frames (the
    first one frame longer), concatenated over time."""
    state, parts, start = StreamState(), [], 0
    while start < x_BCTHW.shape[2]:
        end = start + (1 + chunk if start == 0 else chunk)
        parts.append(step(x_BCTHW[:, :, start:end], state))
        start = end
    return torch.cat(parts, dim=2)


def timed(fn, device: torch.device, iters: int, warmup: int) -> tuple[float, float, object]:
    """(seconds per call, peak GiB, last output)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    reset_peak(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / iters, peak_gib(device), out


@torch.no_grad()
def measure(model: VideoTokenizer, shape, batch: int, mode: str, args, device) -> dict:
    t, h, w = shape
    video = torch.rand(batch, 3, t, h, w, device=device, dtype=next(model.parameters()).dtype) * 2 - 1
    tau = model.cfg.temporal_factor
    if mode == "whole":
        enc = lambda: model.encode(video)  # noqa: E731
    else:
        enc = lambda: run_stream(model.encode, video, args.chunk_frames)  # noqa: E731
    try:
        enc_s, enc_mem, latent = timed(enc, device, args.iters, args.warmup)
        del video
        if mode == "whole":
            dec = lambda: model.decode(latent)  # noqa: E731
        else:
            dec = lambda: run_stream(model.decode, latent, args.chunk_frames // tau)  # noqa: E731
        dec_s, dec_mem, _ = timed(dec, device, args.iters, args.warmup)
    except torch.OutOfMemoryError:
        reset_peak(device)
        return {"oom": True}
    return {"encode_clips_per_s": batch / enc_s, "encode_peak_gib": enc_mem,
            "decode_clips_per_s": batch / dec_s, "decode_peak_gib": dec_mem,
            "latent_shape": list(latent.shape)}


def main() -> int:
    args = build_parser().parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = args.tf32
        torch.backends.cudnn.allow_tf32 = args.tf32
        torch.backends.cudnn.benchmark = True
    if args.tokenizer:
        from tokenizer.checkpoint import load_tokenizer
        base = load_tokenizer(args.tokenizer)
    else:
        torch.manual_seed(0)
        base = VideoTokenizer(load_config(TokenizerTrainConfig, args.recipe).model)
    shapes = [parse_shape(s) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batch.split(",")]
    if len(batches) != len(shapes):
        raise SystemExit("--batch needs one entry per --shapes entry")
    dtypes = args.dtypes.split(",")
    params = sum(p.numel() for p in base.parameters()) / 1e6
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"tokenizer: {params:.1f}M params, d={base.cfg.latent_dim}, channels {base.cfg.channels}, "
          f"{base.cfg.spatial_factor}x spatial, tau={base.cfg.temporal_factor}; device {gpu}; "
          f"torch {torch.__version__}; tf32={'on' if args.tf32 else 'off'}")
    rows = []
    for dtype_name in dtypes:
        model = VideoTokenizer(base.cfg)
        model.load_state_dict(base.state_dict())
        model = model.to(device=device, dtype=DTYPES[dtype_name]).eval()
        for shape, batch in zip(shapes, batches):
            modes = ["whole"]
            if args.chunk_frames and shape[0] > 1 + args.chunk_frames:
                modes.append("stream")
            for mode in modes:
                r = measure(model, shape, batch, mode, args, device)
                rows.append({"dtype": dtype_name, "shape": "x".join(map(str, shape)), "batch": batch,
                             "mode": mode, **r})
                print_row(rows[-1])
        del model
        reset_peak(device)
    print_ratios(rows, dtypes)
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "device": gpu, "params_m": params}, indent=2))
    return 0


def print_row(r: dict) -> None:
    head = f"{r['dtype']:>5} {r['shape']:>12} b={r['batch']:<3} {r['mode']:<6}"
    if r.get("oom"):
        print(f"{head} out of memory")
        return
    print(f"{head} encode {r['encode_clips_per_s']:9.3f} clips/s peak {r['encode_peak_gib']:7.2f} GiB | "
          f"decode {r['decode_clips_per_s']:9.3f} clips/s peak {r['decode_peak_gib']:7.2f} GiB")


def print_ratios(rows: list[dict], dtypes: list[str]) -> None:
    if len(dtypes) < 2:
        return
    base_name = dtypes[0]
    print(f"\nratios vs {base_name} (throughput: higher is faster; memory: lower is smaller)")
    index = {(r["dtype"], r["shape"], r["mode"]): r for r in rows}
    for r in rows:
        if r["dtype"] == base_name:
            continue
        b = index.get((base_name, r["shape"], r["mode"]))
        if b is None or b.get("oom") or r.get("oom"):
            print(f"{r['dtype']}/{base_name} {r['shape']:>12} {r['mode']:<6} n/a (out of memory)")
            continue
        print(f"{r['dtype']}/{base_name} {r['shape']:>12} {r['mode']:<6} "
              f"encode x{r['encode_clips_per_s'] / b['encode_clips_per_s']:.2f} speed, "
              f"x{r['encode_peak_gib'] / b['encode_peak_gib']:.2f} memory | "
              f"decode x{r['decode_clips_per_s'] / b['decode_clips_per_s']:.2f} speed, "
              f"x{r['decode_peak_gib'] / b['decode_peak_gib']:.2f} memory")


if __name__ == "__main__":
    sys.exit(main())
