"""``videoar pretokenize``: videos → token shards (one worker per process; torchrun or SLURM array)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from videoar_megatron.cli._recipe_args import add_recipe_args, load_recipe
from videoar_common.config import save_resolved_config
from videoar_common.exit_codes import InputError


def build_parser(prog: str) -> argparse.ArgumentParser:
    from data_prep.pretokenize.config import PretokenizeConfig
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Decode clips with DALI (NVDEC on GPU hosts, CPU elsewhere), encode them with the tokenizer "
                    "(bf16 on GPU), quantize them with the multi-scale BSQ schedule and write MDS token shards "
                    "plus manifest.json and rejects.jsonl. Launch one process per GPU with torchrun or as a "
                    "SLURM array (slurm/pretokenize.sbatch): each worker takes its own partitions of the input "
                    "manifest; a rerun skips committed partitions and redoes interrupted ones; the last worker "
                    "to finish merges the indexes.")
    add_recipe_args(p, PretokenizeConfig, recipe_help="recipe YAML (see recipes/pretokenize/)",
                    set_example="clips.num_frames=33", required_knobs=("tokenizer", "input_manifest", "output_dir"))
    p.add_argument("--merge-only", action="store_true",
                   help="only merge the committed partitions (the dependent job after a SLURM array); "
                        "fails naming the partitions that are not committed")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


class _Progress:
    """One tqdm bar per worker over the videos of its pending partitions."""

    def __init__(self, total: int, desc: str, enabled: bool):
        from tqdm import tqdm
        self.bar = tqdm(total=total, desc=desc, unit="video", disable=not enabled, dynamic_ncols=True,
                        mininterval=1.0 if sys.stderr.isatty() else 30.0)
        self.done: dict[str, int] = {}
        self.clips: dict[str, int] = {}
        self.rejects: dict[str, int] = {}
        self.time: dict[str, float] = {}

    def __call__(self, stats) -> None:
        import time
        name = stats.partition
        self.time.setdefault(name, time.perf_counter())
        self.bar.update(stats.videos_done - self.done.get(name, 0))
        self.done[name], self.clips[name], self.rejects[name] = stats.videos_done, stats.clips, stats.rejects
        elapsed = max(time.perf_counter() - min(self.time.values()), 1e-6)
        self.bar.set_postfix(clips=sum(self.clips.values()), clips_s=f"{sum(self.clips.values()) / elapsed:.1f}",
                             rejects=sum(self.rejects.values()), refresh=False)

    def close(self) -> None:
        self.bar.close()


def main(argv: list[str], prog: str = "videoar pretokenize") -> int:
    args = build_parser(prog).parse_args(argv)
    from data_prep.pretokenize.config import PretokenizeConfig
    from data_prep.pretokenize.pipeline import Pretokenizer, merge_only
    from data_prep.pretokenize.worker import worker_from_env
    from data_prep.pretokenize.writer import DecoderBroken
    from tokenizer import load_tokenizer
    from videoar_common.run_logging import setup_console_logging
    cfg = load_recipe(args, PretokenizeConfig)
    if args.print_config:
        from videoar_common.config import dump_config
        print(dump_config(cfg), end="")
        return 0
    worker = worker_from_env()
    log = setup_console_logging(worker.index)
    log.setLevel("INFO")  # workers are independent (own partitions, own log files): all report
    try:
        if args.merge_only:
            summary = merge_only(cfg)
            if summary["samples"] == 0:
                raise InputError(_nothing_kept(cfg))
            log.info("merged %s: %s", cfg.output_dir, summary)
            return 0
        pretok = Pretokenizer(cfg, worker, load_tokenizer)
        save_resolved_config(cfg, Path(cfg.output_dir) / "logs" / f"worker-{worker.index:05d}")
        pending = pretok.pending()
        log.info("worker %d of %d (%s): %d partitions of %d pending, %d videos; decode on %s, encode on %s",
                 worker.index, worker.count, worker.launcher, len(pending), pretok.num_partitions,
                 sum(pending.values()), pretok.decode_device, pretok.device)
        progress = _Progress(sum(pending.values()), f"pretokenize w{worker.index}", cfg.progress_bar)
        try:
            stats = pretok.run(progress)
        finally:
            progress.close()
    except DecoderBroken as e:  # this machine's decoder (driver, DALI build), not the input: exit 1
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # shard, tokenizer and manifest refusals are InputErrors already
        raise InputError(str(e)) from e
    for s in stats:
        if not s.skipped:
            log.info("%s: %d clips from %d videos, %d rejects, %.1f clips/s (decode %.1fs, waited %.1fs, "
                     "encode %.1fs, write %.1fs)", s.partition, s.clips, s.videos, s.rejects, s.clips_per_s,
                     s.decode_s, s.wait_s, s.encode_s, s.write_s)
    marker = Path(cfg.output_dir) / "COMMITTED"
    if not marker.is_file():
        log.info("done: this worker's partitions are committed; the merge waits for the other workers")
        return 0
    import json
    summary = json.loads(marker.read_text())
    if summary["samples"] == 0:
        raise InputError(_nothing_kept(cfg))
    log.info("done: all %d partitions merged: %d samples, %d rejects (see %s/rejects.jsonl, "
             "`videoar shards inspect %s`)", summary["partitions"], summary["samples"], summary["rejects"],
             cfg.output_dir, cfg.output_dir)
    return 0


def _nothing_kept(cfg) -> str:
    """The refusal of a run in which every manifest row was rejected: the input (manifest, clip knobs) is
    what to fix, so it is an exit-2 error with the rejects by kind, not a warning after a success."""
    from data_prep.shard_inspect import summarize
    s = summarize(cfg.output_dir)
    kinds = ", ".join(f"{k} {v}" for k, v in s["rejects_by_kind"].items())
    examples = "; ".join(f"e.g. {k}: {reason}" for k, reason in s["reject_examples"].items())
    return (f"no clip was kept: every video of input_manifest={cfg.input_manifest} was rejected "
            f"({s['rejects']} rejects: {kinds}; {examples}); the committed shard set {cfg.output_dir} is empty; every reason is in "
            f"{cfg.output_dir}/rejects.jsonl (clip length: clips.num_frames, codecs: `videoar transcode`, paths)")
