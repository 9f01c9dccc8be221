"""One GPU: does the context-parallel machinery cost anything at CP=1? The VideoAR training step (batch
build, forward, loss, backward, AdamW) of one model timed two ways in the same process, alternating:

- ``plain``: the step as without context parallelism (what ``parallel.context_parallel=1`` runs);
- ``split``: the same step forced through the CP path with a one-rank split (``model.always_split``):
  embeddings by position, RoPE and mask rows through index tables (a FlexAttention ``mask_mod`` with
  query and key tables), the key/value gather (a no-op for one rank), the head and loss on index lists.

Training at CP=1 takes the plain path, so this prices what CP adds per rank beyond its communication.
The goal: split / plain tokens/s >= 0.99. Multi-GPU CP speed and memory belong to
benchmarks/bench_ar_train.py on a multi-GPU host.

    python benchmarks/bench_ar_cp.py [--layouts stage3] [--size L] [--rounds 3] [--iters 10]
    python benchmarks/bench_ar_cp.py --device cpu --size tiny --layouts ucf --iters 1 --rounds 1   # smoke
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import LAYOUTS, one_process_groups, time_ms  # noqa: E402
from tokenizer.quantizer import MultiScaleBSQ  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.model.config import ModelConfig, ParallelConfig  # noqa: E402
from videoar_megatron.model.model import build_model  # noqa: E402
from videoar_megatron.model.sequence import build_batch  # noqa: E402
from videoar_megatron.training.engine import micro_batch_loss  # noqa: E402

GOAL = 0.99


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layouts", default="stage3", help="comma list of: " + ", ".join(LAYOUTS))
    p.add_argument("--size", default="L", help="named VideoAR size (tiny, L, XL, 4B)")
    p.add_argument("--batch", type=int, default=1, help="samples per step")
    p.add_argument("--latent-dim", type=int, default=48, help="bits per token d (paper 48)")
    p.add_argument("--p-mask", type=float, default=0.0, help="Random Frame Mask drop probability")
    p.add_argument("--flex-kernel", default="triton", choices=["auto", "triton", "flash"], help="ModelConfig.flex_kernel")
    p.add_argument("--recompute", default="none", choices=["none", "full", "core_attn"], help="activation recompute")
    p.add_argument("--iters", type=int, default=10, help="timed steps per measurement (median)")
    p.add_argument("--rounds", type=int, default=3, help="alternating plain/split measurements (median of rounds)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of this script only")
    return p.parse_args(argv)


def model_config(args, layout) -> ModelConfig:
    """The model bench_ar_train_step.py times (text-feature prefix of the layout's length)."""
    return build_dataclass(ModelConfig, {
        "size": args.size, "latent_dim": args.latent_dim, "max_scales": max(16, layout.num_scales),
        "condition": {"kind": "text_features", "text_len": layout.prefix_len, "feature_dim": 1024},
        "mask": {"rfm_window": 0, "rfm_p_mask": args.p_mask}, "flex_kernel": args.flex_kernel})


def step_fn(model, cfg, layout, batch_size, device):
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")
    H, W = layout.scales[-1]
    q = MultiScaleBSQ(dim=cfg.latent_dim, scales=layout.scales)
    latent = torch.randn(batch_size, cfg.latent_dim, layout.frames, H, W, device=device)
    feats = torch.randn(batch_size, layout.prefix_len, 1024, device=device, dtype=dtype)
    gen = torch.Generator(device).manual_seed(0)

    def step():
        batch = build_batch(q, cfg, latent_BdTHW=latent, cond=feats, training=True, generator=gen)
        micro_batch_loss(model, model(batch), batch, cfg.loss).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(args, name, groups, device) -> None:
    layout = LAYOUTS[name]
    cfg = model_config(args, layout)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, ParallelConfig(recompute=args.recompute), groups, device=device, params_dtype=dtype)
    step = step_fn(model, cfg, layout, args.batch, device)
    times = {"plain": [], "split": []}
    for _ in range(args.rounds):
        for path in ("plain", "split"):
            model.always_split = path == "split"
            times[path].append(time_ms(step, device, args.iters))
    plain, split = (statistics.median(times[k]) for k in ("plain", "split"))
    tokens = args.batch * layout.seq_len
    print(f"\n[{name}] {cfg.size}: {cfg.num_layers} x {cfg.hidden_size}, S={layout.seq_len}, batch {args.batch}, "
          f"flex_kernel={cfg.flex_kernel}, recompute={args.recompute}, RFM p={args.p_mask}")
    for path in ("plain", "split"):
        ms = statistics.median(times[path])
        print(f"  {path:<6} step {ms:9.1f} ms  {tokens / ms * 1e3:10.0f} tok/s   rounds: "
              + ", ".join(f"{t:.1f}" for t in times[path]))
    ratio = plain / split
    print(f"  => split / plain tokens/s = {ratio:.4f} (goal >= {GOAL}: {'met' if ratio >= GOAL else 'NOT met'})")
    del model


def main(argv=None) -> int:
    args = parse(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_ar_cp needs a CUDA GPU (or --device cpu for a smoke test)", file=sys.stderr)
        return 2
    with one_process_groups(args.device) as (ctx, groups):
        name_dev = torch.cuda.get_device_name() if ctx.device.type == "cuda" else "cpu"
        print(f"device: {name_dev}, torch {torch.__version__}")
        for name in args.layouts.split(","):
            measure(args, name, groups, ctx.device)
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
