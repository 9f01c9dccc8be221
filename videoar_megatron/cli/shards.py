"""``videoar shards``: inspect a token shard set (counts, shapes, rejects, a PNG of decoded samples)
or merge its committed partitions."""
from __future__ import annotations

import argparse
import json

from videoar_common.exit_codes import InputError


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Inspect or merge token shards written by `videoar pretokenize`.")
    sub = p.add_subparsers(dest="action", required=True)
    i = sub.add_parser("inspect", help="counts, shapes, dtypes, reject summary; optional PNG of decoded samples",
                       description="Print what a shard directory holds (partitions, samples, shapes, dtypes, "
                                   "rejects by kind, labels). With --tokenizer, also decode a few samples' bits back "
                                   "through the tokenizer under their source frames, check that each stored "
                                   "latent re-quantizes to the stored bits, and save it as a PNG.")
    i.add_argument("dir", help="shard directory (output_dir of the pretokenize recipe)")
    i.add_argument("--tokenizer", default="", help="tokenizer directory to decode samples for the PNG "
                                                  "(must have the manifest's tokenizer_hash)")
    i.add_argument("--png", default="", help="PNG path (default DIR/logs/inspect.png when --tokenizer is given)")
    i.add_argument("--samples", type=int, default=4, help="samples in the PNG (default 4)")
    i.add_argument("--source-root", default="", help="directory the sample sources are relative to "
                                                     "(default: the input manifest's directory from the run's config)")
    i.add_argument("--json", action="store_true", help="print the summary as JSON")
    m = sub.add_parser("merge", help="merge committed partitions (same as `videoar pretokenize --merge-only`)")
    m.add_argument("dir", help="shard directory")
    return p


def main(argv: list[str], prog: str = "videoar shards") -> int:
    args = build_parser(prog).parse_args(argv)
    from data_prep import shard_inspect as insp
    from tokenizer.checkpoint import load_tokenizer
    try:
        if args.action == "merge":
            from data_prep.pretokenize.pipeline import merge_only
            print(json.dumps(merge_only(args.dir), indent=2))
            return 0
        summary = insp.summarize(args.dir)
        print(json.dumps(summary, indent=2) if args.json else insp.format_summary(summary))
        if args.tokenizer:
            png = insp.render_samples(args.dir, load_tokenizer(args.tokenizer), png=args.png or None,
                                      num=args.samples, source_root=args.source_root or None)
            print(f"wrote {png}")
    except ValueError as e:  # e.g. --samples out of range (shard and tokenizer refusals are InputErrors)
        raise InputError(str(e)) from e
    return 0
