"""Context-parallel load balance of the VideoAR mask (CPU, seconds): attended (query, key) pairs per
rank, max/min, for the split the trainer uses (128-token chunks dealt by torch's processing-time
round-robin scheduler over the mask rule's work per chunk) next to head-tail chunks (torch's
``_HeadTailLoadBalancer``, the zigzag of Megatron's ``get_batch_on_this_cp_rank``) and a contiguous
split, on the stage-III layouts (64 caption tokens, 8 scales of 384x672, 2,555 tokens per latent frame).

    python benchmarks/cp_balance.py [--frames 9,17,33] [--cp 2,4,8,16] [--windows 0,4]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from videoar_megatron.model.context_parallel import attended_pairs_per_rank, row_work  # noqa: E402
from videoar_megatron.model.layout import TokenLayout  # noqa: E402

STAGE3_SCHEDULE = ((1, 1), (2, 3), (4, 7), (8, 14), (12, 21), (16, 28), (20, 35), (24, 42))


def head_tail(work_S: torch.Tensor, cp: int) -> list[int]:
    from torch.distributed.tensor.experimental._context_parallel._load_balancer import _HeadTailLoadBalancer
    order = _HeadTailLoadBalancer(len(work_S), cp, "cpu")._generate_indices().flatten()
    return [int(x) for x in work_S[order].view(cp, -1).sum(-1)]


def contiguous(work_S: torch.Tensor, cp: int) -> list[int]:
    return [int(x) for x in work_S.view(cp, -1).sum(-1)]


def ratio(pairs: list[int]) -> float:
    return max(pairs) / min(pairs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="9,17,33", help="latent frames (33, 65, 129 video frames)")
    p.add_argument("--cp", default="2,4,8,16", help="context-parallel sizes")
    p.add_argument("--windows", default="0,4", help="Random Frame Mask windows (0 = unlimited)")
    p.add_argument("--chunk", type=int, default=128, help="parallel.context_parallel_chunk")
    args = p.parse_args(argv)
    print(f"{'frames':>6} {'window':>6} {'CP':>3} {'tokens':>7}  max/min: {'balanced':>9} {'head-tail':>9} "
          f"{'contiguous':>10}   (tokens: padded for the balanced split)")
    for frames in map(int, args.frames.split(",")):
        for window in map(int, args.windows.split(",")):
            for cp in map(int, args.cp.split(",")):
                # Each split on its own padding: chunks need CP x chunk, head-tail 2 x CP, contiguous CP
                # (a pad is one pair of work: needless pads would flatter or hurt a split).
                layout = TokenLayout.padded(64, STAGE3_SCHEDULE, frames, cp * args.chunk)
                balanced = attended_pairs_per_rank(layout, cp, args.chunk, window)
                zigzag = head_tail(row_work(TokenLayout.padded(64, STAGE3_SCHEDULE, frames, 2 * cp), window), cp)
                plain = contiguous(row_work(TokenLayout.padded(64, STAGE3_SCHEDULE, frames, cp), window), cp)
                print(f"{frames:>6} {window:>6} {cp:>3} {layout.seq_len:>7}           {ratio(balanced):>9.3f} "
                      f"{ratio(zigzag):>9.3f} {ratio(plain):>10.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
