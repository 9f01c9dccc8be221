"""``videoar tokenizer train|eval|inflate``: the 3D causal multi-scale BSQ video tokenizer."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from videoar_common.exit_codes import InputError
from videoar_megatron.cli._recipe_args import add_recipe_args, load_recipe

SUMMARY = "train, evaluate or inflate the 3D causal multi-scale BSQ video tokenizer (DeepSpeed)"


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(x) for x in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like HxW (e.g. 128x128), got {text!r}") from None
    return h, w


def build_parser(prog: str) -> argparse.ArgumentParser:
    from tokenizer.train_config import TokenizerTrainConfig
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="The VideoAR video tokenizer: causal 3D CNN + temporal-independent multi-scale BSQ.\n\n"
                    "  train    train with DeepSpeed (two engines, ZeRO 1/2), auto-resume from the run directory\n"
                    "  eval     PSNR/SSIM, bit usage per scale and a reconstruction grid on held-out clips\n"
                    "  inflate  build a video tokenizer from a 2-D image tokenizer state dict\n\n"
                    f"Run `{prog} COMMAND --help` for a command's options.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", formatter_class=argparse.RawDescriptionHelpFormatter,
                       help="train a tokenizer from a recipe",
                       description="Train the tokenizer described by a recipe. Multi-process: "
                                   "`torchrun --nproc_per_node=N -m videoar_megatron.cli tokenizer train ...`. "
                                   "Re-running the same command resumes from the newest committed checkpoint "
                                   "in the run directory. Writes metrics.jsonl, loss_curves.png, eval/<step>/ "
                                   "(eval.json, recon_grid.png), rejects.jsonl, checkpoints/ and, at the end, "
                                   "the exported tokenizer directory <run-dir>/tokenizer. Exit codes (as `videoar train`): "
                                   "0 done (or stopped by stop_after); 75 saved after a signal or "
                                   "preemption.time_limit_minutes, requeue me (REQUEUE_REQUESTED is written "
                                   "too); 2 checkpoint refused (world size, model recipe, data sources); 3 "
                                   "non-finite steps (numerics.on_nonfinite=stop or numerics.max_nonfinite).")
    add_recipe_args(t, TokenizerTrainConfig, recipe_help="recipe YAML (e.g. recipes/tokenizer/tiny.yaml)",
                    set_example="steps=200")
    t.add_argument("--run-dir", default=None,
                   help="run directory (default: runs/tokenizer-<recipe name>); never deleted, resumed if present")

    e = sub.add_parser("eval", help="evaluate a tokenizer on held-out clips",
                       description="Reconstruct held-out clips (centre clip of each source, file order) and "
                                   "report PSNR/SSIM (all scales and the first k scales), bit entropy / ones "
                                   "fraction / unique codes per scale, and write eval.json plus recon_grid.png "
                                   "(original vs reconstruction from k = 1..K scales). Either --run (reads the "
                                   "run's config and exported tokenizer) or --tokenizer with --manifest.")
    e.add_argument("--run", default=None, help="a training run directory (uses <run>/tokenizer and its config)")
    e.add_argument("--tokenizer", default=None, help="a tokenizer directory (overrides the run's export)")
    e.add_argument("--manifest", default=None, help="held-out videos: CSV/JSONL manifest or .txt list of paths")
    e.add_argument("--out", default=None, help="output directory (default: <run>/eval/cli or ./tokenizer_eval)")
    e.add_argument("--num-clips", type=int, default=None,
                   help="clips to evaluate (default: the run's eval.num_clips or 16)")
    e.add_argument("--batch-size", type=int, default=4, help="clips per forward (default 4)")
    e.add_argument("--frames", type=int, default=None, help="frames per clip, 1 + 4k (default: the run's or 17)")
    e.add_argument("--frame-stride", type=int, default=None, help="take every n-th frame (default: the run's or 1)")
    e.add_argument("--size", type=_size, default=None,
                   help="HxW after resize+centre crop (default: the run's or 128x128)")
    e.add_argument("--grid-clips", type=int, default=3, help="clips in the PNG grid (default 3)")
    e.add_argument("--grid-frames", type=int, default=5, help="frames per clip in the grid (default 5)")
    e.add_argument("--compare-untrained", action="store_true",
                   help="also evaluate a freshly initialised tokenizer of the same config (seed 0) and print both")
    e.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="compute device (default auto)")

    i = sub.add_parser("inflate", help="inflate a 2-D image tokenizer into a video tokenizer directory",
                       description="Build the recipe's video tokenizer, put every 2-D conv kernel of the image "
                                   "tokenizer into the temporally-last slice of its causal 3-D kernel (the rest "
                                   "zero), copy norms and biases, leave temporal-only layers at their identity "
                                   "init, and write a tokenizer directory (config, weights, content hash, "
                                   "COMMITTED) plus inflation_report.json listing mapped and left-at-init keys. "
                                   "Use it with init.from_tokenizer, or give the image checkpoint directly as "
                                   "init.inflate_from.",
                       epilog=f"Recipe knobs: see `{prog} train --help`.")
    i.add_argument("--image-ckpt", required=True,
                   help="2-D image tokenizer state dict (.safetensors/.pt/.pth) with keys of tokenizer.image2d")
    add_recipe_args(i, recipe_help="tokenizer recipe whose model section describes the architecture",
                    set_example="model.base_channels=128")
    i.add_argument("--out", required=True, help="output tokenizer directory")
    i.add_argument("--seed", type=int, default=0, help="seed of the layers left at init (default 0)")
    return p


def cmd_train(args) -> int:
    """Parse, build, train, close; errors become the exit codes of `videoar train` (videoar_common.exit_codes):
    refusals (recipe, resume, data) are InputErrors, which the dispatcher turns into exit 2."""
    from tokenizer.train_config import TokenizerTrainConfig
    from tokenizer.trainer import run_with_init_stage
    from videoar_common.distributed import init_distributed, shutdown_distributed
    from videoar_common.exit_codes import EXIT_NUMERICS
    from videoar_common.numerics import NumericsError
    from videoar_common.run_logging import setup_console_logging
    prog = "videoar tokenizer train"
    cfg = load_recipe(args, TokenizerTrainConfig)
    recipe_dir = _init_recipe_dir(args.recipe)
    run_dir = Path(args.run_dir or f"runs/tokenizer-{Path(args.recipe).stem}")
    ctx = init_distributed(cfg.device)
    setup_console_logging(ctx.rank)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        return run_with_init_stage(cfg, ctx, run_dir, recipe_dir, recipe_name=args.recipe)
    except NumericsError as err:
        print(f"{prog}: {err}", file=sys.stderr)
        return EXIT_NUMERICS
    finally:
        shutdown_distributed()


def _init_recipe_dir(recipe: str) -> Path:
    """Where init.from_recipe resolves: beside the recipe file that sets it (which may be a base recipe)."""
    from videoar_common.config import read_recipe_chain
    _, origin = read_recipe_chain(recipe)
    source = origin.get("init.from_recipe") or origin.get("init") or str(recipe)
    return Path(source).parent if source.endswith((".yaml", ".yml")) else Path.cwd()


def _eval_setup(args):
    """(tokenizer dir, manifest, ClipSamplingConfig, out dir, num clips) from --run and/or explicit flags."""
    from data_prep.video import ClipSamplingConfig
    from tokenizer.train_config import TokenizerTrainConfig
    from videoar_common.config import load_config
    clip, manifest, num, tok, out = ClipSamplingConfig(num_frames=17, height=128, width=128), None, 16, None, None
    if args.run:
        run = Path(args.run)
        if not (run / "config.yaml").is_file():
            raise InputError(f"--run {run}: {run}/config.yaml not found: not a tokenizer run directory")
        cfg = load_config(TokenizerTrainConfig, run / "config.yaml")
        clip, num, tok, out = cfg.data.clip, cfg.eval.num_clips, run / "tokenizer", run / "eval" / "cli"
        synth_eval = str(run / "synth" / "eval" / "metadata.csv") if cfg.data.synth.enabled else None
        manifest = cfg.eval.manifest or synth_eval
    tok = Path(args.tokenizer) if args.tokenizer else tok
    manifest = args.manifest or manifest
    if tok is None or manifest is None:
        raise InputError("give --run, or --tokenizer and --manifest")
    changes = {k: v for k, v in (("num_frames", args.frames), ("frame_stride", args.frame_stride)) if v is not None}
    if args.size is not None:
        changes.update(height=args.size[0], width=args.size[1])
    clip = dataclasses.replace(clip, **changes)
    return tok, manifest, clip, Path(args.out) if args.out else (out or Path("tokenizer_eval")), args.num_clips or num


def cmd_eval(args) -> int:
    import torch
    from data_prep.clip_dataset import RejectLog, eval_batches, read_sources, source_for
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.evaluate import evaluate_tokenizer
    from tokenizer.model import VideoTokenizer
    from videoar_common.distributed import pick_device
    tok_dir, manifest, clip, out, num = _eval_setup(args)
    device = pick_device(args.device, 0)
    model = load_tokenizer(tok_dir, device=device)
    records = read_sources(manifest)
    rejects = RejectLog(out / "rejects.jsonl")

    def run(m, sub):
        source = source_for(records, clip, device="gpu" if device.type == "cuda" else "cpu",
                            batch_size=args.batch_size, origin=str(manifest))
        batches = eval_batches(records, source, batch_size=args.batch_size, limit=num, rejects=rejects)
        return evaluate_tokenizer(m, batches, device=device, out_dir=out / sub, grid_clips=args.grid_clips,
                                  grid_frames=args.grid_frames, title=f"{sub}: {tok_dir}")

    results = {"trained": run(model, "trained")}
    if args.compare_untrained:
        torch.manual_seed(0)
        results["untrained"] = run(VideoTokenizer(model.cfg).to(device).eval(), "untrained")
    _print_eval(results, tok_dir, manifest, out)
    return 0


def _print_eval(results: dict, tok_dir, manifest, out: Path) -> None:
    names = list(results)
    keys = [k for k in results[names[0]] if k != "clips"]
    print(f"tokenizer {tok_dir} on {results[names[0]]['clips']} clips of {manifest}")
    print(f"{'metric':<28}" + "".join(f"{n:>12}" for n in names))
    for k in keys:
        print(f"{k:<28}" + "".join(f"{results[n][k]:>12.4f}" for n in names))
    if "untrained" in results:
        gain = results["trained"]["psnr"] - results["untrained"]["psnr"]
        print(f"PSNR trained {results['trained']['psnr']:.2f} dB vs untrained {results['untrained']['psnr']:.2f} dB "
              f"(+{gain:.2f} dB)")
    print(f"wrote {out}/<{'|'.join(names)}>/eval.json and recon_grid.png")


def cmd_inflate(args) -> int:
    import torch
    from tokenizer.checkpoint import save_tokenizer
    from tokenizer.inflate import inflate_from_file
    from tokenizer.model import VideoTokenizer
    from tokenizer.train_config import TokenizerTrainConfig
    from videoar_common.atomic import atomic_write_json
    cfg = load_recipe(args, TokenizerTrainConfig)
    torch.manual_seed(args.seed)
    model = VideoTokenizer(cfg.model)
    report = inflate_from_file(model, args.image_ckpt)
    out = Path(args.out)
    digest = save_tokenizer(model, out, extra_meta={"inflated_from": str(args.image_ckpt),
                                                    "num_mapped": len(report.mapped),
                                                    "left_at_init": report.left_at_init})
    atomic_write_json(out / "inflation_report.json", report.to_dict())
    print(report.summary())
    print(f"wrote tokenizer {out} (content hash {digest[:12]}) and {out / 'inflation_report.json'}")
    return 0


def main(argv: list[str], prog: str = "videoar tokenizer") -> int:
    args = build_parser(prog).parse_args(argv)
    return {"train": cmd_train, "eval": cmd_eval, "inflate": cmd_inflate}[args.command](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
