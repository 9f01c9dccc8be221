"""``videoar synth``: write a synthetic class-labelled video corpus plus its manifest."""
from __future__ import annotations

import argparse

from data_prep.synth import CODECS, MOTIONS, SHAPES, make_corpus
from videoar_common.exit_codes import InputError


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 64x64), got {text!r}") from None
    return h, w


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Write N videos of moving shapes whose shape, colour and motion depend on the class, "
                    "encoded with PyAV, and a manifest (path, caption, label) that `videoar pretokenize` "
                    "and tokenizer training read. The same seed gives byte-identical files.",
        epilog=f"shapes: {', '.join(SHAPES)}; motions: {', '.join(MOTIONS)}. "
               "vp9 and mjpeg decode with DALI on CPU and GPU; h264 only on GPU (NVDEC).")
    p.add_argument("--out", required=True, help="output directory (videos/ and the manifest go here)")
    p.add_argument("--num", type=int, default=64, help="number of videos (default 64)")
    p.add_argument("--classes", type=int, default=4, help="number of classes; labels cycle 0..K-1 (default 4)")
    p.add_argument("--codec", choices=sorted(CODECS), default="vp9", help="video codec (default vp9)")
    p.add_argument("--frames", type=int, default=17, help="frames per video (default 17)")
    p.add_argument("--size", type=_size, default=(64, 64), help="frame size HxW, even numbers (default 64x64)")
    p.add_argument("--fps", type=int, default=8, help="frame rate written into the container (default 8)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--manifest", default="metadata.csv",
                   help="manifest file name inside --out, .csv or .jsonl (default metadata.csv)")
    return p


def main(argv: list[str], prog: str = "videoar synth") -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        manifest = make_corpus(args.out, num=args.num, classes=args.classes, codec=args.codec,
                               frames=args.frames, size=args.size, fps=args.fps, seed=args.seed,
                               manifest_name=args.manifest, progress=True)
    except ValueError as e:
        raise InputError(str(e)) from e
    print(f"wrote {args.num} videos and {manifest}")
    return 0
