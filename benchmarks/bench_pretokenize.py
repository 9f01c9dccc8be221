"""Pre-tokenization throughput: DALI decode feeding the tokenizer encoder vs a PyAV CPU-decode baseline
feeding the same encoder, measured in one run, plus the encoder alone (the ceiling) and where the time
goes (decode busy time, time the encoder waited for frames, encode, write).

    python benchmarks/bench_pretokenize.py                      # GPU host: 17x128² and 33x384x672
    python benchmarks/bench_pretokenize.py --preset tiny --device cpu --clips 16   # CPU smoke run

Goal (issue 5): DALI GPU decode is encoder-bound (pipeline clips/s close to encoder-only clips/s) and
>= 3x the PyAV baseline. Both paths run the production code (`data_prep.pretokenize.Pretokenizer`),
differing only in the `decoder` / `decode_device` knobs. Source videos are synthetic (a moving
texture, cheap to render at any size) encoded with --source-codec at --source-size; a few unique files
are repeated to reach --clips (page cache helps both decoders alike). The tokenizer is random-init
unless --tokenizer is given (throughput does not depend on the weights).
Needs torch, PyAV, nvidia-dali, and mosaicml-streaming unless --no-write.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402


@dataclass(frozen=True)
class Preset:
    frames: int
    height: int
    width: int
    source: tuple[int, int]      # source video (height, width)
    source_frames: int
    batch_size: int
    clips: int


PRESETS = {
    "17x128": Preset(17, 128, 128, (240, 320), 40, 32, 512),          # UCF-101-like sources
    "33x384x672": Preset(33, 384, 672, (720, 1280), 80, 4, 64),      # 720p sources, stage III clips
    "tiny": Preset(9, 32, 32, (48, 64), 12, 4, 16),                  # CPU smoke run
}


def make_sources(out: Path, preset: Preset, codec: str, unique: int, clips: int, fps: int = 24) -> Path:
    """``unique`` synthetic videos, repeated in a manifest of ``clips`` rows (one clip per row)."""
    import av
    from data_prep.manifest import VideoRecord, write_manifest
    encoders = {"h264": ("libx264", "mp4", {"preset": "veryfast", "crf": "23"}),
                "hevc": ("libx265", "mp4", {"preset": "fast", "x265-params": "log-level=error"}),
                "vp9": ("libvpx-vp9", "webm", {"deadline": "realtime", "cpu-used": "8", "row-mt": "1"}),
                "mpeg4": ("mpeg4", "avi", {"q:v": "4"})}
    encoder, suffix, options = encoders[codec]
    h, w = preset.source
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for v in range(unique):
        rng = np.random.default_rng(v)
        tex = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        tex = np.kron(tex, np.ones((8, 8, 1), np.uint8))[:h, :w]  # blocky texture: cheap, compressible
        path = out / f"src{v:03d}.{suffix}"
        with av.open(str(path), "w") as c:
            s = c.add_stream(encoder, rate=fps, options=dict(options))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for t in range(preset.source_frames):
                frame = np.roll(tex, (2 * t, 3 * t), axis=(0, 1))
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        paths.append(path)
    records = [VideoRecord(path=str(paths[i % unique]), caption="texture", label=i % 10) for i in range(clips)]
    return write_manifest(out / "manifest.csv", records, relative_to=out)


def make_tokenizer(out: Path, args, preset: Preset) -> Path:
    from tokenizer import save_tokenizer
    from tokenizer.config import TokenizerModelConfig
    from tokenizer.model import VideoTokenizer
    grid = [preset.height // 16, preset.width // 16]
    cfg = TokenizerModelConfig(base_channels=args.base_channels, num_res_blocks=args.res_blocks,
                               latent_dim=args.latent_dim, norm_groups=min(32, args.base_channels),
                               scale_schedule=[[1, 1], grid] if grid != [1, 1] else [[1, 1]])
    save_tokenizer(VideoTokenizer(cfg), out)
    return out


class NullWriter:
    """Stands in for MDSWriter with --no-write (counts bytes, writes nothing)."""

    def __init__(self, **kwargs):
        self.bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, sample):
        self.bytes += sum(v.nbytes for v in sample.values() if isinstance(v, np.ndarray))


def run_pipeline(args, preset: Preset, tok: Path, manifest: Path, work: Path, decoder: str, decode_device: str):
    """One full pre-tokenization over ``manifest``; returns the partition stats (after a warm-up run)."""
    from data_prep import pretokenize
    from data_prep.pretokenize import PretokenizeConfig, Pretokenizer, Worker
    from data_prep.video import ClipSamplingConfig
    if args.no_write:
        pretokenize._mds_writer = lambda: NullWriter
    stats = None
    for attempt in ("warmup", "measured"):
        out = work / f"{decoder}-{decode_device}-{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = PretokenizeConfig(
            tokenizer=str(tok), input_manifest=str(manifest if attempt == "measured" else args._warm_manifest),
            output_dir=str(out), clips=ClipSamplingConfig(num_frames=preset.frames, height=preset.height,
                                                          width=preset.width, clips_per_video=1),
            batch_size=args.batch_size or preset.batch_size, device=args.device, decoder=decoder,
            decode_device=decode_device, decode_threads=args.decode_threads if decoder == "dali" else args.cpu_workers,
            probe_workers=args.probe_workers, num_partitions=1, latent_dtype="bfloat16",
            deterministic=args.deterministic, progress_bar=False)
        stats = Pretokenizer(cfg, Worker(0, 1)).run()[0]
        shutil.rmtree(out, ignore_errors=True)
    return stats


@torch.no_grad()
def encoder_only(args, preset: Preset, tok: Path, iters: int) -> float:
    """Clips/s of encode + quantize alone on resident random frames (the ceiling of the pipeline)."""
    from data_prep.pretokenize import ClipEncoder, PretokenizeConfig
    from data_prep.video import ClipSamplingConfig
    cfg = PretokenizeConfig(tokenizer=str(tok), input_manifest="-", output_dir="-", latent_dtype="bfloat16",
                            clips=ClipSamplingConfig(num_frames=preset.frames, height=preset.height, width=preset.width),
                            deterministic=args.deterministic)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = args.deterministic
        torch.backends.cudnn.benchmark = not args.deterministic
    enc = ClipEncoder(cfg, device)
    bs = args.batch_size or preset.batch_size
    frames = [torch.randint(0, 255, (preset.frames, preset.height, preset.width, 3), dtype=torch.uint8, device=device)
              for _ in range(bs)]
    enc.encode(frames, ["x"] * bs)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        enc.encode(frames, ["x"] * bs)
    sync()
    return iters * bs / (time.perf_counter() - t0)


def breakdown(s) -> dict:
    return {"clips": s.clips, "rejects": s.rejects, "clips_per_s": round(s.clips_per_s, 2),
            "total_s": round(s.total_s, 3), "decode_busy_s": round(s.decode_s, 3),
            "encoder_waited_for_frames_s": round(s.wait_s, 3), "encode_s": round(s.encode_s, 3),
            "write_s": round(s.write_s, 3)}


def bench_preset(name: str, args, work: Path) -> dict:
    preset = PRESETS[name]
    clips = args.clips or preset.clips
    cuda = args.device != "cpu" and torch.cuda.is_available()
    print(f"\n== {name}: {clips} clips of {preset.frames}x{preset.height}x{preset.width} from "
          f"{preset.source[1]}x{preset.source[0]} {args.source_codec} ({'cuda' if cuda else 'cpu'}) ==", flush=True)
    src = work / f"src-{name}"
    manifest = make_sources(src, preset, args.source_codec, args.unique_videos, clips)
    bs = args.batch_size or preset.batch_size
    args._warm_manifest = make_sources(src / "warm", preset, args.source_codec, 1, 2 * bs)
    tok = Path(args.tokenizer) if args.tokenizer else make_tokenizer(work / f"tok-{name}", args, preset)
    dali_device = "gpu" if cuda else "cpu"
    result = {"preset": name, "clips": clips, "batch_size": bs, "source_codec": args.source_codec,
              "source_size": list(preset.source), "device": "cuda" if cuda else "cpu",
              "gpu": torch.cuda.get_device_name() if cuda else None}
    result[f"dali_{dali_device}"] = breakdown(run_pipeline(args, preset, tok, manifest, work, "dali", dali_device))
    print(f"  DALI {dali_device:3s} decode -> encoder: {result[f'dali_{dali_device}']}", flush=True)
    result["pyav_cpu"] = breakdown(run_pipeline(args, preset, tok, manifest, work, "pyav", "cpu"))
    print(f"  PyAV cpu decode -> encoder: {result['pyav_cpu']}", flush=True)
    result["encoder_only_clips_per_s"] = round(encoder_only(args, preset, tok, args.encoder_iters), 2)
    d, p = result[f"dali_{dali_device}"]["clips_per_s"], result["pyav_cpu"]["clips_per_s"]
    e = result["encoder_only_clips_per_s"]
    result["speedup_dali_vs_pyav"] = round(d / p, 2) if p else None
    result["dali_fraction_of_encoder_only"] = round(d / e, 3) if e else None
    print(f"  encoder only: {e} clips/s | DALI/PyAV = {result['speedup_dali_vs_pyav']}x (goal >= 3x) | "
          f"DALI pipeline at {100 * (result['dali_fraction_of_encoder_only'] or 0):.0f}% of encoder-only", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[*PRESETS, "both"], default="both", help="both = 17x128 and 33x384x672")
    p.add_argument("--clips", type=int, default=0, help="clips per preset (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=0, help="clips per batch (default: the preset's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="encoder device")
    p.add_argument("--source-codec", choices=["h264", "hevc", "vp9", "mpeg4"], default="h264",
                   help="codec of the synthetic sources (default h264; use vp9 for --device cpu)")
    p.add_argument("--unique-videos", type=int, default=8, help="distinct source files (default 8)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir (default: random init, see --base-channels)")
    p.add_argument("--base-channels", type=int, default=64, help="random tokenizer width (default 64)")
    p.add_argument("--res-blocks", type=int, default=2, help="random tokenizer res blocks per level (default 2)")
    p.add_argument("--latent-dim", type=int, default=32, help="random tokenizer bits per token (default 32)")
    p.add_argument("--decode-threads", type=int, default=4, help="DALI threads (default 4)")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 4,
                   help="PyAV baseline decode threads (default: all cores)")
    p.add_argument("--probe-workers", type=int, default=8)
    p.add_argument("--encoder-iters", type=int, default=10, help="batches timed for encoder-only")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="allow cuDNN autotuned (non-deterministic) kernels; the shipped recipes are deterministic")
    p.add_argument("--no-write", action="store_true", help="skip MDS writing (if mosaicml-streaming is missing)")
    p.add_argument("--out", default="", help="write the results JSON here (default: print only)")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    if args.device == "cpu" and args.source_codec not in ("vp9",):
        print("note: DALI on CPU decodes only vp8/vp9/mjpeg; using --source-codec vp9")
        args.source_codec = "vp9"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pretok_"))
    names = ["17x128", "33x384x672"] if args.preset == "both" else [args.preset]
    try:
        results = [bench_preset(n, args, work) for n in names]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps({"results": results, "torch": torch.__version__}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
