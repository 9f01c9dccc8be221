"""``videoar demo``: the whole pipeline on a synthetic corpus, on CPU, through the real CLI."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from videoar_common.exit_codes import InputError
from videoar_megatron.demo import PRESETS, TIMING_DOC, StageFailed, run_demo


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="End to end on the embedded default: write a 4-class synthetic VP9 corpus, train the tiny "
                    "tokenizer (image stage, then inflated video stage), pre-tokenize the corpus into MDS "
                    "shards, train a small class-conditional AR model, sample videos of every class, and "
                    "write a report (report/metrics.json, recon_grid.png, loss_curves.png, samples.gif, "
                    "sample_frames.png). Each stage runs the `videoar` command a user would run, with a recipe "
                    "from recipes/demo/; its full output goes to logs/<stage>.log. Re-running skips finished "
                    "stages.",
        epilog=f"presets: full (the demo; how long it takes on CPU is measured in {TIMING_DOC}), ci (the same "
               "code path, smaller; for tests). Training stages print their step, loss and ETA as they go.")
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output directory (default runs/demo)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="full", help="sizes of the run (default full)")
    return p


def main(argv: list[str], prog: str = "videoar demo") -> int:
    args = build_parser(prog).parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise InputError(f"--out {args.out} is a file, not a directory")
    try:
        metrics = run_demo(args.out.resolve(), args.preset)
    except StageFailed as e:  # the stage's own message and log tail are the report; no traceback
        print(f"{prog}: {e}", file=sys.stderr)
        return e.returncode
    print(f"tokenizer PSNR {metrics['tokenizer_psnr_db']:.2f} dB (untrained "
          f"{metrics['tokenizer_psnr_untrained_db']:.2f} dB); AR loss {metrics['ar_loss_start']:.3f} -> "
          f"{metrics['ar_loss_end']:.3f}, bit accuracy {metrics['ar_bit_accuracy_end']:.3f}; "
          f"{metrics['samples']} samples of {metrics['sample_frames']} frames")
    return 0
