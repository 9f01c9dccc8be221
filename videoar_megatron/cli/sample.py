"""``videoar sample``: videos from an AR checkpoint (class labels, prompts, or none; V2V / I2V).

Parse → load (checkpoint, tokenizer, sampler) → generate → write → close. Launch with ``torchrun`` to
spread samples over ranks (``--set tensor_parallel=2`` splits the model too). Output directory::

    videos/sample_00000.mp4 ...   one mp4 per sample (TP rank 0 of each data-parallel group writes)
    grid.gif, frames.png          the first output.grid_max_videos videos tiled (animated), and their frames
                                  as a sheet, one row per video labelled with its class or prompt
    config.yaml                   the resolved sampling recipe
    index.json                    files, conditions, sample ids, seeds, checkpoint, tokenizer (last)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.distributed as dist

from videoar_common.atomic import atomic_write_json
from videoar_megatron.cli._recipe_args import add_recipe_args, load_recipe
from videoar_common.config import save_resolved_config
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_common.exit_codes import InputError
from videoar_megatron.evaluation.protocols import shard_bounds
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.extend import generate_videos
from videoar_megatron.sampling.loading import LoadedSampler, load_sampler
from videoar_megatron.sampling.sampler import Conditions
from videoar_megatron.sampling.video_io import (read_image, read_video, to_uint8, write_frame_sheet,
                                                write_gif_grid, write_mp4)


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Sample videos from a VideoAR checkpoint: KV-cached next-frame / next-scale decoding with "
                    "temporal-spatial classifier-free guidance and per-bit sampling, decoded by the tokenizer. "
                    "Videos longer than the checkpoint's window, --video (video-to-video) and --image "
                    "(image-to-video) are made window by window by re-encoding the last frames.")
    p.add_argument("--ckpt", required=True,
                   help="AR checkpoint: a committed step_XXXXXXXX directory, a checkpoint root, or a "
                        "`videoar train` run directory (the newest committed step)")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer directory; its content hash must match the checkpoint's tokenizer_hash")
    add_recipe_args(p, SamplingConfig, required=False,
                    recipe_help="sampling recipe YAML (e.g. recipes/sample/ucf101.yaml); default: built-in defaults",
                    set_example="frames=33 --set guidance.gamma=4")
    cond = p.add_argument_group("conditions (by the checkpoint's model_config.condition.kind)")
    cond.add_argument("--class", dest="classes", action="append", default=[], metavar="LABEL",
                      help="class-conditional checkpoints: a class id, or a name from --class-names "
                           "(repeatable; comma lists allowed)")
    cond.add_argument("--class-names", metavar="FILE", help="text file with one class name per line (line i = class i)")
    cond.add_argument("--prompt", action="append", default=[], metavar="TEXT",
                      help="text-conditioned checkpoints: a prompt (repeatable)")
    cond.add_argument("--text-encoder", metavar="DIR",
                      help="local Hugging Face directory for --prompt: the frozen encoder (kind text_features) "
                           "or the tokenizer (kind text_tokens) used when the shards were made")
    ext = p.add_argument_group("extension")
    ext.add_argument("--video", metavar="PATH",
                     help="continue this video (V2V): its frames (fitted to the checkpoint's resolution) come first "
                          "in every output, then new frames; frames counts both")
    ext.add_argument("--image", metavar="PATH", help="image-to-video: this image is frame 0 of every output")
    p.add_argument("--num", type=int, default=1, help="videos per condition (default 1)")
    p.add_argument("--out", required=True, help="output directory (videos/, grid.gif, index.json)")
    return p


# --- conditions ---------------------------------------------------------------------------------

def _class_ids(values: list[str], names_file: str | None, num_classes: int) -> tuple[list[int], list[str]]:
    names = Path(names_file).read_text().splitlines() if names_file else []
    names = [n.strip() for n in names if n.strip()]
    ids = []
    for item in (x.strip() for v in values for x in v.split(",") if x.strip()):
        if item.lstrip("-").isdigit():
            ids.append(int(item))
        elif item in names:
            ids.append(names.index(item))
        else:
            raise ValueError(f"--class {item!r} is neither a class id nor a name in --class-names "
                             f"({names_file or 'not given'})")
    bad = [i for i in ids if not 0 <= i < num_classes]
    if bad:
        raise ValueError(f"--class ids {bad} outside [0, {num_classes}) (the checkpoint's condition.num_classes)")
    return ids, [names[i] if i < len(names) else str(i) for i in ids]


def _encode_prompts(prompts: list[str], kind: str, encoder_dir: str | None, text_len: int, device):
    """Prompts → (token ids or features ``(n, |Ψ|, ·)``, lengths), as pre-tokenization made them."""
    if not encoder_dir:
        raise ValueError("--prompt needs --text-encoder DIR (the text encoder/tokenizer the shards were made with)")
    if kind == "text_tokens":
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(encoder_dir, local_files_only=True)
        enc = tok(prompts, padding="max_length", truncation=True, max_length=text_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"].sum(1)
    try:
        from data_prep.text_encoder import FrozenTextEncoder, TextEncoderConfig
    except ImportError as e:
        raise ValueError(f"kind text_features needs data_prep.text_encoder (pre-tokenization), not in this build: {e}")
    encoder = FrozenTextEncoder(TextEncoderConfig(path=encoder_dir, max_length=text_len), device)
    feats, mask = encoder.encode(prompts)
    return torch.from_numpy(feats).float(), torch.from_numpy(mask).long().sum(1)


def build_requests(args, loaded: LoadedSampler) -> tuple[Conditions, list[dict]]:
    """All samples' conditions (N per condition, sample id = position) and their index entries."""
    cfg = loaded.info.model_cfg
    kind, n = cfg.condition.kind, args.num
    if n < 1:
        raise ValueError(f"--num must be >= 1, got {n}")
    if kind == "class":
        if not args.classes or args.prompt:
            raise ValueError("this checkpoint is class-conditional: give --class (and no --prompt)")
        ids, names = _class_ids(args.classes, args.class_names, cfg.condition.num_classes)
        cond = Conditions.labels([i for i in ids for _ in range(n)])
        meta = [{"class": i, "class_name": name} for i, name in zip(ids, names) for _ in range(n)]
        return cond, meta
    if kind == "none":
        if args.classes or args.prompt:
            raise ValueError("this checkpoint is unconditional: drop --class / --prompt")
        return Conditions.unconditional(n), [{} for _ in range(n)]
    if not args.prompt or args.classes:
        raise ValueError(f"this checkpoint is text-conditioned ({kind}): give --prompt (and no --class)")
    text, lens = _encode_prompts(args.prompt, kind, args.text_encoder, cfg.prefix_len, loaded.ctx.device)
    rep = torch.arange(len(args.prompt)).repeat_interleave(n)
    return Conditions.text(kind, text[rep], lens[rep]), [{"prompt": p} for p in args.prompt for _ in range(n)]


def _context(args, loaded: LoadedSampler) -> tuple[torch.Tensor | None, str | None]:
    if args.video and args.image:
        raise ValueError("give --video or --image, not both")
    if args.video:
        return read_video(args.video, loaded.resolution)[None], str(Path(args.video).resolve())
    if args.image:
        return read_image(args.image, loaded.resolution)[None], str(Path(args.image).resolve())
    return None, None


# --- run ----------------------------------------------------------------------------------------

def _progress(total: int, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc="sampling", unit="video", disable=not enabled, dynamic_ncols=True)


def generate_all(args, cfg: SamplingConfig, loaded: LoadedSampler, out: Path) -> tuple[list[dict], dict]:
    """This data-parallel rank's share of the samples: generate, write mp4s; returns index entries and
    uint8 videos of the ones that go into the grid."""
    cond, meta = build_requests(args, loaded)
    context, _ = _context(args, loaded)
    dp = loaded.groups.dp
    lo, hi = shard_bounds(cond.count, dp.rank(), dp.size())
    writer = loaded.groups.tp.rank() == 0
    entries, grid = [], {}
    with _progress(hi - lo, cfg.progress and loaded.ctx.is_main) as bar:
        for start in range(lo, hi, cfg.batch_size):
            stop = min(start + cfg.batch_size, hi)
            ids = list(range(start, stop))
            videos = generate_videos(loaded.sampler, loaded.tokenizer, cond.select(slice(start, stop)), ids,
                                     seed=cfg.seed, frames=cfg.frames, context=context,
                                     context_latent_frames=cfg.context_latent_frames)
            for i, video in zip(ids, videos):
                frames = to_uint8(video)
                name = f"videos/sample_{i:05d}.mp4"
                if writer:
                    write_mp4(out / name, frames, cfg.output.fps, cfg.output.codec)
                if i < cfg.output.grid_max_videos:
                    grid[i] = frames
                entries.append({"id": i, "file": name, "condition": meta[i], "frames": int(frames.shape[0]),
                                "seed": cfg.seed})
            bar.update(len(ids))
    return entries, grid


def _gather(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def write_index(args, cfg: SamplingConfig, loaded: LoadedSampler, out: Path, entries: list[dict], grid: dict,
                seconds: float) -> Path:
    videos = [grid[i] for i in sorted(grid)]
    by_id = {e["id"]: e for e in entries}
    labels = [_label(by_id[i]["condition"], i) for i in sorted(grid)]
    write_gif_grid(out / "grid.gif", videos, cfg.output.grid_columns, cfg.output.fps)
    write_frame_sheet(out / "frames.png", videos, labels=labels)
    info = loaded.info
    index = {"checkpoint": str(info.path.resolve()), "step": info.step,
             "tokenizer": str(loaded.tokenizer_dir.resolve()), "tokenizer_hash": loaded.tokenizer.content_hash,
             "context": _context_path(args), "seed": cfg.seed, "fps": cfg.output.fps,
             "resolution": list(loaded.resolution), "window_frames": loaded.window_pixel_frames,
             "random_streams": "sample i, window w: bits.sample_key(seed, i, w)",
             "world_size": loaded.ctx.world_size, "seconds": round(seconds, 3),
             "grid": "grid.gif", "frame_sheet": "frames.png", "frame_sheet_rows": labels, "config": "config.yaml",
             "samples": sorted(entries, key=lambda e: e["id"])}
    return atomic_write_json(out / "index.json", index)


def _label(condition: dict, sample_id: int, max_chars: int = 24) -> str:
    """The row label of a sample in frames.png: its class (name), prompt, or id when unconditional."""
    if "class" in condition:
        name = condition["class_name"]
        return f"class {name}" if name == str(condition["class"]) else name[:max_chars]
    if "prompt" in condition:
        prompt = condition["prompt"]
        return prompt if len(prompt) <= max_chars else prompt[:max_chars - 3] + "..."
    return f"sample {sample_id}"


def _context_path(args) -> str | None:
    path = args.video or args.image
    return str(Path(path).resolve()) if path else None


def run(args, cfg: SamplingConfig, loaded: LoadedSampler) -> int:
    out = Path(args.out)
    t0 = time.time()
    entries, grid = generate_all(args, cfg, loaded, out)
    gathered = _gather((entries, grid))
    if loaded.ctx.is_main:
        merged = {e["id"]: e for part in gathered for e in part[0]}
        grids = {i: v for part in gathered for i, v in part[1].items()}
        save_resolved_config(cfg, out)
        path = write_index(args, cfg, loaded, out, list(merged.values()), grids, time.time() - t0)
        print(f"wrote {len(merged)} videos to {out / 'videos'}; grid {out / 'grid.gif'}; index {path}")
    loaded.ctx.barrier()
    return 0


def main(argv: list[str], prog: str = "videoar sample") -> int:
    args = build_parser(prog).parse_args(argv)
    cfg = load_recipe(args, SamplingConfig)
    ctx = init_distributed(device=cfg.device)
    loaded = None
    try:
        loaded = load_sampler(args.ckpt, args.tokenizer, cfg, ctx)
        return run(args, cfg, loaded)
    except ValueError as e:  # a condition or context argument (--class, --video, ...) that cannot be used
        raise InputError(str(e)) from e
    finally:
        if loaded is not None:
            loaded.close()
        shutdown_distributed()
