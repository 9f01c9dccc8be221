"""``videoar eval``: gFVD of a VideoAR checkpoint, tokenizer reconstruction (rFVD/PSNR/SSIM), and
the real-set statistics both reuse.

Parse → build → run → close; the work is in ``videoar_megatron.evaluation``. Launch with ``torchrun``
to spread generation, decoding and I3D features over ranks; rank 0 writes ``<out>/config.yaml``, the
JSON report and a Markdown table next to the paper's numbers.

``fvd`` samples with :mod:`videoar_megatron.sampling` (``--tokenizer`` and a sampling recipe,
``--sample-recipe``); each rank holds the whole model (tensor_parallel 1) and generates its share of
every fold, each sample seeded by its global sample id, so the videos do not depend on the world size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tokenizer import load_tokenizer
from videoar_megatron.cli._recipe_args import add_recipe_args, knobs_epilog, load_recipe
from videoar_common.config import ConfigError, config_to_dict, load_config, save_resolved_config
from videoar_common.distributed import DistContext, init_distributed, shutdown_distributed
from videoar_common.exit_codes import InputError
from videoar_megatron.evaluation.clips import ManifestClipSource
from videoar_megatron.evaluation.config import EvalConfig
from videoar_megatron.evaluation.fvd import RealStatsCache
from videoar_megatron.evaluation.i3d import load_feature_extractor
from videoar_megatron.evaluation.protocols import GenerateFn, compute_real_stats, run_fvd_protocol
from videoar_megatron.evaluation.recon import evaluate_reconstruction, tokenizer_reconstruct
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.extend import generate_videos
from videoar_megatron.sampling.loading import LoadedSampler, load_sampler
from videoar_megatron.sampling.sampler import Conditions
from videoar_megatron.evaluation.report import fvd_markdown, recon_markdown, write_report


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="FVD with the Kinetics-400 I3D (weights from a local path), gFVD protocols "
                    "(MAGVIT-v2/NBP folds or a single run), tokenizer rFVD/PSNR/SSIM.",
        epilog=knobs_epilog(EvalConfig))
    sub = p.add_subparsers(dest="command", required=True, metavar="{fvd,rfvd,real-stats}")
    specs = {"fvd": "gFVD of an AR checkpoint under recipe.protocol, sampled with --sample-recipe",
             "rfvd": "rFVD, PSNR and SSIM of a tokenizer on data.heldout_manifest",
             "real-stats": "compute and cache the real-set statistics of recipe.protocol"}
    for name, help_text in specs.items():
        s = sub.add_parser(name, help=help_text, description=help_text,
                           epilog=f"Recipe knobs: see `{prog} --help`.")
        add_recipe_args(s, recipe_help="evaluation recipe (e.g. recipes/eval/ucf101_fvd.yaml)",
                        set_example="protocol.num_samples=2000")
        s.add_argument("--out", required=name != "real-stats",
                       help="output directory for config.yaml and the reports")
    fvd = sub.choices["fvd"]
    fvd.add_argument("--checkpoint", required=True,
                     help="VideoAR AR checkpoint: a committed step directory, a checkpoint root or a run "
                          "directory (newest)")
    fvd.add_argument("--tokenizer", required=True,
                     help="tokenizer directory (its hash must match the checkpoint's tokenizer_hash)")
    fvd.add_argument("--sample-recipe", required=True,
                     help="sampling recipe (guidance schedule, temperature, top-p, seed), e.g. "
                          "recipes/sample/ucf101.yaml; its frames knob is replaced by protocol.num_frames")
    fvd.add_argument("--sample-set", action="append", default=[], metavar="KEY=VALUE",
                     help="override a sampling-recipe knob (repeatable), e.g. --sample-set seed=1")
    sub.choices["rfvd"].add_argument("--tokenizer", required=True, help="tokenizer checkpoint directory")
    return p


# ----------------------------------------------------------------------------------------------
# Builders.
# ----------------------------------------------------------------------------------------------

def _decode_device(cfg: EvalConfig, ctx: DistContext) -> tuple[str, int]:
    choice = cfg.data.decode_device
    if choice == "auto":
        choice = "gpu" if ctx.device.type == "cuda" else "cpu"
    return choice, (ctx.device.index or 0) if ctx.device.type == "cuda" else 0


def clip_source(cfg: EvalConfig, ctx: DistContext, manifest: str, clips_per_video: int,
                knob: str) -> ManifestClipSource:
    if not manifest:
        raise ConfigError(f"{knob} is empty: set it to a CSV/JSONL manifest with class labels")
    device, device_id = _decode_device(cfg, ctx)
    return ManifestClipSource(manifest, num_frames=cfg.protocol.num_frames, resolution=cfg.protocol.resolution,
                              fps=cfg.protocol.fps, clips_per_video=clips_per_video, decode_device=device,
                              device_id=device_id, batch_size=cfg.data.decode_batch_size,
                              num_threads=cfg.data.decode_threads)


def load_generator(args, cfg: EvalConfig, ctx: DistContext) -> tuple[GenerateFn, LoadedSampler, SamplingConfig]:
    """The VideoAR sampler of ``args.checkpoint`` as the protocol's ``generate(labels_B, sample_ids_B) ->
    videos (B, 3, protocol.num_frames, protocol.resolution, protocol.resolution)`` in [-1, 1]: sample
    ``i`` draws its bits from the stream keyed by (sampling seed, i), whatever rank or batch makes it."""
    scfg = load_config(SamplingConfig, args.sample_recipe, args.sample_set)
    if scfg.tensor_parallel != 1:
        raise ConfigError("videoar eval fvd runs tensor_parallel=1 per rank (data parallel over ranks); "
                          f"the sampling recipe sets tensor_parallel={scfg.tensor_parallel}")
    loaded = load_sampler(args.checkpoint, args.tokenizer, scfg, ctx)
    p = cfg.protocol
    kind = loaded.info.model_cfg.condition.kind
    if kind != "class":
        loaded.close()
        raise ConfigError(f"gFVD protocols are class-conditional; the checkpoint's condition.kind is {kind!r}")
    if loaded.resolution != (p.resolution, p.resolution):
        loaded.close()
        raise ConfigError(f"the checkpoint makes {loaded.resolution} videos but protocol.resolution={p.resolution}")

    def generate(labels_B: torch.Tensor, sample_ids_B: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, len(labels_B), scfg.batch_size):
            ids = sample_ids_B[i:i + scfg.batch_size].tolist()
            out.append(generate_videos(loaded.sampler, loaded.tokenizer,
                                       Conditions.labels(labels_B[i:i + scfg.batch_size]), ids, seed=scfg.seed,
                                       frames=p.num_frames, context_latent_frames=scfg.context_latent_frames))
        return torch.cat(out)

    return generate, loaded, scfg


# ----------------------------------------------------------------------------------------------
# Commands.
# ----------------------------------------------------------------------------------------------

def run_real_stats(args, cfg: EvalConfig, ctx: DistContext) -> int:
    extractor = load_feature_extractor(cfg.extractor, ctx.device)
    source = clip_source(cfg, ctx, cfg.data.train_manifest, cfg.data.clips_per_video, "data.train_manifest")
    done = compute_real_stats(cfg.protocol, source=source, extractor=extractor, ctx=ctx,
                              cache=RealStatsCache(cfg.cache_dir), progress=cfg.progress)
    if ctx.is_main:
        for k, (hit, path) in enumerate(done):
            print(f"real set {k}: {'cached' if hit else 'computed'} {path}")
        for path, reason in source.rejects:
            print(f"rejected {path}: {reason}", file=sys.stderr)
    return 0


def run_fvd(args, cfg: EvalConfig, ctx: DistContext) -> int:
    generate, loaded, scfg = load_generator(args, cfg, ctx)
    try:
        extractor = load_feature_extractor(cfg.extractor, ctx.device)
        source = clip_source(cfg, ctx, cfg.data.train_manifest, cfg.data.clips_per_video, "data.train_manifest")
        result = run_fvd_protocol(cfg.protocol, generate=generate, source=source, extractor=extractor, ctx=ctx,
                                  cache=RealStatsCache(cfg.cache_dir), progress=cfg.progress).to_dict()
    finally:
        loaded.close()
    if ctx.is_main:
        save_resolved_config(cfg, args.out)
        extra = {"checkpoint": str(loaded.info.path.resolve()), "step": loaded.info.step,
                 "tokenizer": {"path": str(Path(args.tokenizer).resolve()),
                               "content_hash": loaded.tokenizer.content_hash},
                 "sampling": config_to_dict(scfg), "rejects": source.rejects}
        paths = write_report(args.out, "fvd_report", result, fvd_markdown(result), extra=extra)
        print(f"gFVD {result['mean']:.2f} ± {result['std']:.2f} → {paths[0]}, {paths[1]}")
    return 0


def run_rfvd(args, cfg: EvalConfig, ctx: DistContext) -> int:
    tokenizer = load_tokenizer(args.tokenizer, device=ctx.device)
    extractor = load_feature_extractor(cfg.extractor, ctx.device)
    source = clip_source(cfg, ctx, cfg.data.heldout_manifest, cfg.data.heldout_clips_per_video,
                         "data.heldout_manifest")
    result = evaluate_reconstruction(cfg.recon, reconstruct=tokenizer_reconstruct(tokenizer), source=source,
                                     extractor=extractor, ctx=ctx, progress=cfg.progress).to_dict()
    if ctx.is_main:
        save_resolved_config(cfg, args.out)
        extra = {"tokenizer": {"path": str(Path(args.tokenizer).resolve()),
                               "content_hash": getattr(tokenizer, "content_hash", "")},
                 "rejects": source.rejects}
        paths = write_report(args.out, "rfvd_report", result, recon_markdown(result), extra=extra)
        print(f"rFVD {result['rfvd']:.2f}, PSNR {result['psnr']:.2f} dB, SSIM {result['ssim']:.4f} "
              f"→ {paths[0]}, {paths[1]}")
    return 0


COMMANDS = {"fvd": run_fvd, "rfvd": run_rfvd, "real-stats": run_real_stats}


def main(argv: list[str], prog: str = "videoar eval") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = load_recipe(args, EvalConfig)
    ctx = init_distributed(device=cfg.device)
    try:
        return COMMANDS[args.command](args, cfg, ctx)
    except NotImplementedError as e:  # a protocol knob this build cannot run: the recipe's to change
        raise InputError(f"{args.command}: {e}") from e
    finally:
        shutdown_distributed()
