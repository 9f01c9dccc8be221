"""``videoar transcode``: re-encode what DALI cannot decode on the target device (PyAV, parallel, resumable)."""
from __future__ import annotations

import argparse

from videoar_common.exit_codes import InputError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Read a manifest, re-encode every video whose codec DALI cannot decode on --target-device "
                    "(DALI CPU: vp8, vp9, mjpeg; GPU/NVDEC adds h264, hevc, av1, mpeg4) to VP9 WebM (or MJPEG), "
                    "mirroring the source layout under --out, and write a new manifest there that points at "
                    "the new files (and at the untouched originals). Outputs are written atomically; a rerun "
                    "skips outputs that exist. Failures go to OUT/transcode_rejects.jsonl with their reason.")
    p.add_argument("--manifest", required=True, help="input manifest (CSV or JSONL)")
    p.add_argument("--out", required=True, help="output directory for the transcoded videos and the new manifest")
    p.add_argument("--codec", choices=["vp9", "mjpeg"], default="vp9", help="output codec (default vp9)")
    p.add_argument("--target-device", choices=["cpu", "gpu", "all"], default="cpu",
                   help="decode device the output must suit: cpu (default) transcodes h264/hevc/mpeg4/...; "
                        "gpu only what NVDEC cannot decode; all transcodes everything")
    p.add_argument("--workers", type=int, default=4, help="parallel processes, one video each (default 4)")
    p.add_argument("--max-short-side", type=int, default=0,
                   help="shrink videos whose shorter side is larger than this (0 = keep the size)")
    p.add_argument("--manifest-name", default="", help="name of the new manifest (default: the input's name)")
    return p


def main(argv: list[str], prog: str = "videoar transcode") -> int:
    args = build_parser(prog).parse_args(argv)
    from tqdm import tqdm

    from data_prep.manifest import read_manifest
    from data_prep.transcode import REJECTS_FILE, summarize, transcode_manifest
    try:
        total = len(read_manifest(args.manifest))
        bar = tqdm(total=total, desc="transcode", unit="video", dynamic_ncols=True)
        counts: dict[str, int] = {}

        def progress(res):
            counts[res.status] = counts.get(res.status, 0) + 1
            bar.update(1)
            bar.set_postfix(counts, refresh=False)

        try:
            manifest, results = transcode_manifest(args.manifest, args.out, codec=args.codec,
                                                   target_device=args.target_device, workers=args.workers,
                                                   max_short_side=args.max_short_side,
                                                   manifest_name=args.manifest_name, progress=progress)
        finally:
            bar.close()
    except ValueError as e:  # a knob out of range (a bad manifest is already an InputError)
        raise InputError(str(e)) from e
    s = summarize(results)
    print(f"wrote {manifest}: " + ", ".join(f"{k} {v}" for k, v in sorted(s.items())))
    if s.get("failed"):
        print(f"{s['failed']} videos could not be transcoded; reasons in {args.out}/{REJECTS_FILE}")
    return 0
