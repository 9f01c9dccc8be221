"""``videoar manifest``: build input manifests for known corpora (UCF-101 from its official split files)."""
from __future__ import annotations

import argparse

from videoar_common.exit_codes import InputError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Build an input manifest (path, caption, label) for a corpus.")
    sub = p.add_subparsers(dest="corpus", required=True)
    u = sub.add_parser("ucf101", help="UCF-101 from UCF-101/<Class>/*.avi and ucfTrainTestlist/",
                       description="Label from the class folder (0-based, classInd.txt order), caption from the "
                                   "class name in words. UCF-101 videos are MPEG-4 Part 2: run `videoar transcode` "
                                   "on the result for CPU decoding.")
    u.add_argument("--root", required=True, help="the UCF-101/ directory holding one folder per class")
    u.add_argument("--splits", required=True, help="the ucfTrainTestlist/ directory (classInd.txt, train/testlist0N.txt)")
    u.add_argument("--split", type=int, default=1, choices=[1, 2, 3], help="official split (default 1)")
    u.add_argument("--subset", default="train", choices=["train", "test", "all"], help="default train")
    u.add_argument("--out", required=True, help="manifest to write (.csv or .jsonl); paths are stored relative to it")
    return p


def main(argv: list[str], prog: str = "videoar manifest") -> int:
    args = build_parser(prog).parse_args(argv)
    from data_prep.ucf101 import build_ucf101_manifest
    try:
        path, rows, missing = build_ucf101_manifest(args.root, args.splits, args.out, split=args.split,
                                                    subset=args.subset)
    except ValueError as e:
        raise InputError(str(e)) from e
    print(f"wrote {path}: {rows} videos" + (f", {missing} listed files are missing (they will be rejected "
                                              f"as missing by pretokenize)" if missing else ""))
    return 0
