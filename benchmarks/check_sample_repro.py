"""Does sampling reproduce bit for bit on this GPU? And if not, where does it first diverge?

Decodes the same batch (same labels, same keys) several times with each engine (CUDA graph, eager
KV cache) and compares bits and guided logits call against call. On a mismatch it replays two eager
decodes with a forward hook on every module that records a bit-exact checksum of each output, and
prints the first (call, module) whose output differs although everything before it was identical:
that module (or the kernel behind it) is where nondeterminism enters.

    python benchmarks/check_sample_repro.py                       # VideoAR-L, bf16, batches 1 and 32
    python benchmarks/check_sample_repro.py --batches 32 --deterministic   # torch deterministic mode
    python benchmarks/check_sample_repro.py --device cpu --size tiny --latent-dim 8 --batches 2 --repeats 2
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.ar_common import one_process_groups  # noqa: E402
from benchmarks.bench_sample import build  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.sampling.config import SamplingConfig  # noqa: E402
from videoar_megatron.sampling.extend import window_keys  # noqa: E402
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="L")
    p.add_argument("--batches", default="1,32")
    p.add_argument("--engines", default="graph,eager")
    p.add_argument("--repeats", type=int, default=3, help="calls per (engine, batch)")
    p.add_argument("--latent-dim", type=int, default=48)
    p.add_argument("--scales", default="1,2,3,4,6,8")
    p.add_argument("--latent-frames", type=int, default=5)
    p.add_argument("--tok-channels", type=int, default=16, help="tokenizer width (only its quantizer is used)")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True) (and CUBLAS_WORKSPACE_CONFIG)")
    p.add_argument("--sdpa-backend", default="", help="force one SDPA backend: math, efficient, flash, cudnn")
    return p.parse_args(argv)


def checksum(x: torch.Tensor) -> torch.Tensor:
    """Two int64 sums over the raw bits of ``x``: equal iff (with overwhelming probability) bit-equal."""
    raw = x.detach().contiguous().view(-1)
    raw = raw.view(torch.int16 if raw.element_size() == 2 else torch.int32).to(torch.int64)
    weights = torch.arange(1, raw.numel() + 1, device=raw.device, dtype=torch.int64) % 65521
    return torch.stack([raw.sum(), (raw * weights).sum()])


class OutputTrace:
    """Forward hooks that append (module name, checksum of its first tensor output) per call."""

    def __init__(self, model):
        self.records: list[tuple[str, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in model.named_modules() if name]

    def _hook(self, name):
        def hook(module, inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                self.records.append((name, checksum(out)))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def first_divergence(model, sampler, cond, keys) -> str:
    traces = []
    for _ in range(2):
        trace = OutputTrace(model)
        sampler.generate(cond, keys)
        trace.remove()
        traces.append(trace.records)
    a, b = traces
    if len(a) != len(b):
        return f"different number of module calls: {len(a)} vs {len(b)}"
    for i, ((name, x), (_, y)) in enumerate(zip(a, b)):
        if not torch.equal(x, y):
            return f"module call {i} of {len(a)}: '{name}' (first output that differs; all before were equal)"
    return "no module output differed in the two traced eager decodes"


def compare(name, outs) -> tuple[list[str], bool]:
    """Report lines for every call against call 0, and whether all of them were bit-identical."""
    lines, identical = [], True
    ref = outs[0]
    for i, o in enumerate(outs[1:], start=1):
        same_bits = torch.equal(o.bits_BTLd, ref.bits_BTLd)
        same_logits = torch.equal(o.logits_BTLd, ref.logits_BTLd)
        identical &= same_bits and same_logits
        line = f"  {name}: call {i} vs call 0: bits equal {same_bits}, logits equal {same_logits}"
        if not same_logits:
            diff_TL = (o.logits_BTLd - ref.logits_BTLd).abs().amax(dim=(0, 3))   # (T, L)
            t, l = divmod(int(torch.nonzero(diff_TL.flatten() > 0)[0]), diff_TL.shape[1])
            line += f"; first differing logit at frame {t} token {l}, max |diff| {diff_TL.max():.3g}"
        lines.append(line)
    return lines, identical


def main(argv=None) -> int:
    args = parse(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    mismatch = False
    with one_process_groups(args.device) as (ctx, groups):
        model, cfg, _, quantizer = build(args, ctx, groups)
        backend = None
        if args.sdpa_backend:
            from torch.nn.attention import SDPBackend, sdpa_kernel
            backend = sdpa_kernel({"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                                   "flash": SDPBackend.FLASH_ATTENTION,
                                   "cudnn": SDPBackend.CUDNN_ATTENTION}[args.sdpa_backend])
            backend.__enter__()
        print(f"device {torch.cuda.get_device_name() if ctx.device.type == 'cuda' else 'cpu'}, size {args.size}, "
              f"{args.dtype}, deterministic={args.deterministic}, sdpa={args.sdpa_backend or 'auto'}")
        for B in (int(b) for b in args.batches.split(",")):
            cond = Conditions.labels(torch.arange(B) % 101)
            keys = window_keys(0, range(B), 0)
            per_engine = {}
            for engine in args.engines.split(","):
                knobs = {"kv_cache": True, "cuda_graph": engine == "graph"}
                sampling = build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}, "top_p": 0.97,
                                                            **knobs})
                sampler = VideoARSampler(model, quantizer, cfg, sampling, window_frames=args.latent_frames)
                outs = [sampler.generate(cond, keys, record_logits=True) for _ in range(args.repeats)]
                per_engine[engine] = (sampler, outs)
                lines, identical = compare(f"batch {B} {engine}", outs)
                print("\n".join(lines), flush=True)
                mismatch |= not identical
            if {"graph", "eager"} <= per_engine.keys():
                g, e = per_engine["graph"][1][-1], per_engine["eager"][1][-1]
                print(f"  batch {B}: graph == eager: bits {torch.equal(g.bits_BTLd, e.bits_BTLd)}, "
                      f"logits {torch.equal(g.logits_BTLd, e.logits_BTLd)}")
            if "eager" in per_engine:
                print(f"  batch {B} eager trace: {first_divergence(model, per_engine['eager'][0], cond, keys)}",
                      flush=True)
        if backend is not None:
            backend.__exit__(None, None, None)
    print("REPRODUCIBLE" if not mismatch else "NOT REPRODUCIBLE")
    return 1 if mismatch else 0


if __name__ == "__main__":
    sys.exit(main())
