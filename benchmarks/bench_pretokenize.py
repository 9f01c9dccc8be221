"""Pre-tokenization throughput: DALI decode feeding the tokenizer encoder vs a PyAV CPU-decode baseline
feeding the same encoder, measured in one run, plus what decides the settings: DALI decode alone for
each --decode-pipelines count, the encoder alone (the ceiling) in each --encoder-memory-format, and
where the time of a full run goes (decode busy time, time the encoder waited for frames, encode, write).

    python benchmarks/bench_pretokenize.py                      # GPU host: 17x128² and 33x384x672
    python benchmarks/bench_pretokenize.py --preset all         # also the UCF-101 recipe's sampling
    python benchmarks/bench_pretokenize.py --preset tiny --device cpu --clips 16   # CPU smoke run

Presets: ``17x128`` (320x240 sources of 40 frames, one clip each), ``ucf101`` (the sampling of
recipes/pretokenize/ucf101_17x128.yaml: 7 s sources at 25 fps, 4 clips of 17 frames at 8 fps per
video), ``33x384x672`` (720p sources, one clip each). With several clips per video the decode-only
sweep adds the same decoder decoding every clip on its own (``group_by_video=False``), the same-run
baseline of decoding a video's clips together.

Per preset, in this order: (1) decode only, DALI, once per pipeline count; the fastest count (the
smallest within 5% of the fastest) is chosen; (2) encoder only on resident frames, once per memory
format; the faster is chosen; (2b) decode only while the encoder runs back to back on another thread
(both rates: do the stages overlap on this device or take turns? --no-beside skips it); (3) the full
DALI pipeline with the chosen settings (--full each: once per pipeline count); (4) the full PyAV
pipeline with the chosen memory format. Every figure is printed
with its ratio to (4), the baseline of the same run.

Goal (issue 5): DALI GPU decode is encoder-bound (pipeline clips/s close to encoder-only clips/s) and
>= 3x the PyAV baseline. The full runs use the production code (`data_prep.pretokenize.pipeline.Pretokenizer`),
differing only in the `decoder` / `decode_device` / `decode_pipelines` / `encoder_memory_format` knobs.
Source videos are synthetic (a moving texture, cheap to render at any size) encoded with --source-codec
at the preset's size; a few unique files are repeated to reach --clips (page cache helps both decoders
alike). The tokenizer is random-init unless --tokenizer is given (throughput does not depend on the
weights). Needs torch, PyAV, nvidia-dali, and mosaicml-streaming unless --no-write.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
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
    clips_per_video: int = 1
    source_fps: int = 24
    target_fps: float = 0.0      # 0: every frame (frame_stride 1)

    def sampling(self):
        from data_prep.video import ClipSamplingConfig
        return ClipSamplingConfig(num_frames=self.frames, height=self.height, width=self.width,
                                  clips_per_video=self.clips_per_video, target_fps=self.target_fps)


PRESETS = {
    "17x128": Preset(17, 128, 128, (240, 320), 40, 32, 512),          # UCF-101-size sources, 1 clip each
    # recipes/pretokenize/ucf101_17x128.yaml: 7 s UCF-101-size sources at 25 fps, 4 clips of 17 frames at 8 fps
    "ucf101": Preset(17, 128, 128, (240, 320), 175, 32, 512, clips_per_video=4, source_fps=25, target_fps=8.0),
    "33x384x672": Preset(33, 384, 672, (720, 1280), 80, 4, 64),      # 720p sources, stage III clips
    "tiny": Preset(9, 32, 32, (48, 64), 12, 4, 16),                  # CPU smoke run
    "tiny-multi": Preset(9, 32, 32, (48, 64), 30, 4, 16, clips_per_video=2),  # CPU smoke, clips per video
}


def make_sources(out: Path, preset: Preset, codec: str, unique: int, clips: int) -> Path:
    """``unique`` synthetic videos, repeated in a manifest of ``clips / clips_per_video`` rows."""
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
            s = c.add_stream(encoder, rate=preset.source_fps, options=dict(options))
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            for t in range(preset.source_frames):
                frame = np.roll(tex, (2 * t, 3 * t), axis=(0, 1))
                for p in s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    c.mux(p)
            for p in s.encode():
                c.mux(p)
        paths.append(path)
    rows = max(1, clips // preset.clips_per_video)
    records = [VideoRecord(path=str(paths[i % unique]), caption="texture", label=i % 10) for i in range(rows)]
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


def run_pipeline(args, preset: Preset, tok: Path, manifest: Path, work: Path, decoder: str, decode_device: str,
                 pipelines: int, memory_format: str):
    """One full pre-tokenization over ``manifest``; returns the partition stats (after a warm-up run)."""
    from data_prep.pretokenize import writer
    from data_prep.pretokenize.config import PretokenizeConfig
    from data_prep.pretokenize.pipeline import Pretokenizer
    from data_prep.pretokenize.worker import Worker
    from tokenizer import load_tokenizer
    if args.no_write:
        writer._mds_writer = lambda: NullWriter
    stats = None
    for attempt in ("warmup", "measured"):
        out = work / f"{decoder}-{decode_device}-{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        cfg = PretokenizeConfig(
            tokenizer=str(tok), input_manifest=str(manifest if attempt == "measured" else args._warm_manifest),
            output_dir=str(out), clips=preset.sampling(),
            batch_size=args.batch_size or preset.batch_size, device=args.device, decoder=decoder,
            decode_device=decode_device, decode_threads=args.decode_threads if decoder == "dali" else args.cpu_workers,
            decode_pipelines=pipelines, encoder_memory_format=memory_format,
            probe_workers=args.probe_workers, num_partitions=1, latent_dtype="bfloat16",
            deterministic=args.deterministic, progress_bar=False)
        stats = Pretokenizer(cfg, Worker(0, 1), load_tokenizer).run()[0]
        shutil.rmtree(out, ignore_errors=True)
        release_memory()  # the Pretokenizer's DALI pipelines and encoder, before the next one is built
    return stats


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def clip_plans(preset: Preset, manifest: Path, device: str) -> list:
    """The ClipPlans a pre-tokenization run decodes for ``manifest`` (the preset's clips per row)."""
    from data_prep.manifest import read_manifest
    from data_prep.video import plan_clips, probe_video
    return [p for r in read_manifest(manifest) for p in plan_clips(probe_video(r.path, device), preset.sampling())]


def decode_batches(decoder, plans: list, batch_size: int) -> None:
    """Decode ``plans`` batch by batch as ClipStream does (GPU: on a side stream, synchronised per batch)."""
    stream = torch.cuda.Stream() if decoder.device == "gpu" else None
    for i in range(0, len(plans), batch_size):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            results = decoder.decode(plans[i:i + batch_size])
        if stream is not None:
            stream.synchronize()
        failed = [r for r in results if not isinstance(r, torch.Tensor)]
        if failed:
            raise RuntimeError(f"{len(failed)} clips failed to decode, first: {failed[0].reason}")


def decode_only(args, preset: Preset, plans: list, warm_plans: list, device: str, pipelines: int,
                group_by_video: bool = True) -> float:
    """Clips/s of DALI decoding alone with ``pipelines`` pipelines (no encoder competing for the GPU);
    ``group_by_video=False`` decodes every clip on its own (the decoder before session 4)."""
    from data_prep.video import DaliClipDecoder
    bs = args.batch_size or preset.batch_size
    decoder = DaliClipDecoder(height=preset.height, width=preset.width, device=device, batch_size=bs,
                              num_threads=args.decode_threads, pipelines=pipelines, group_by_video=group_by_video)
    decode_batches(decoder, warm_plans, bs)  # builds every pipeline
    t0 = time.perf_counter()
    decode_batches(decoder, plans, bs)
    rate = len(plans) / (time.perf_counter() - t0)
    del decoder
    release_memory()
    return rate


def make_encoder(args, preset: Preset, tok: Path, memory_format: str):
    """The production ClipEncoder for the preset's batch (its CUDA graph captured for that batch size, as
    in the full runs) and one batch of resident random frames."""
    from data_prep.pretokenize.config import PretokenizeConfig
    from data_prep.pretokenize.encoder import ClipEncoder
    from tokenizer import load_tokenizer
    bs = args.batch_size or preset.batch_size
    cfg = PretokenizeConfig(tokenizer=str(tok), input_manifest="-", output_dir="-", latent_dtype="bfloat16",
                            clips=preset.sampling(), batch_size=bs,
                            deterministic=args.deterministic, encoder_memory_format=memory_format)
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = args.deterministic
        torch.backends.cudnn.benchmark = not args.deterministic
    enc = ClipEncoder(cfg, load_tokenizer(tok, device), device)
    frames = [torch.randint(0, 255, (preset.frames, preset.height, preset.width, 3), dtype=torch.uint8, device=device)
              for _ in range(bs)]
    enc.encode(frames, ["x"] * bs)  # warm-up
    return enc, frames


@torch.no_grad()
def encoder_only(args, preset: Preset, tok: Path, iters: int, memory_format: str) -> float:
    """Clips/s of encode + quantize alone on resident random frames (the ceiling of the pipeline)."""
    enc, frames = make_encoder(args, preset, tok, memory_format)
    sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(iters):
        enc.encode(frames, ["x"] * len(frames))
    sync()
    rate = iters * len(frames) / (time.perf_counter() - t0)
    del enc, frames
    release_memory()
    return rate


def decode_beside_encoder(args, preset: Preset, tok: Path, manifest: Path, device: str, pipelines: int,
                          memory_format: str) -> dict[str, float]:
    """Decode only while the encoder encodes resident frames back to back on another thread: both rates.
    Next to decode-only and encoder-only this says whether the two stages overlap on this device or take
    turns (session 6, H200: NVDEC decode fell from 195 to about 20 clips/s beside a busy encoder)."""
    import threading
    enc, frames = make_encoder(args, preset, tok, memory_format)
    plans, warm = clip_plans(preset, manifest, device), clip_plans(preset, args._warm_manifest, device)
    stop, batches = threading.Event(), [0]

    def encode_forever(encoder, batch):
        if encoder.device.type == "cuda":
            torch.cuda.set_device(encoder.device)
        with torch.no_grad():
            while True:  # at least one batch; the rate's clock stops when the last one has ended
                encoder.encode(batch, ["x"] * len(batch))  # ends in a host copy: synchronised per batch
                batches[0] += 1
                if stop.is_set():
                    return

    thread = threading.Thread(target=encode_forever, args=(enc, frames), daemon=True, name="bench-encoder")
    t0 = time.perf_counter()
    thread.start()
    try:
        decode = decode_only(args, preset, plans, warm, device, pipelines)
    finally:
        stop.set()
        thread.join()
    encode = batches[0] * len(frames) / (time.perf_counter() - t0)
    del enc, frames
    release_memory()
    rates = {"decode_clips_per_s": round(decode, 2), "encoder_clips_per_s": round(encode, 2)}
    print(f"  decode only beside a busy encoder, {pipelines} pipeline(s): {rates}", flush=True)
    return rates


def breakdown(s) -> dict:
    return {"clips": s.clips, "rejects": s.rejects, "clips_per_s": round(s.clips_per_s, 2),
            "total_s": round(s.total_s, 3), "decode_busy_s": round(s.decode_s, 3),
            "encoder_waited_for_frames_s": round(s.wait_s, 3), "encode_s": round(s.encode_s, 3),
            "write_s": round(s.write_s, 3)}


def pick_pipelines(rates: dict[int, float]) -> int:
    """The fewest pipelines within 5% of the fastest decode (fewer threads and NVDEC sessions)."""
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= 0.95 * best)


def sweep_decode(args, preset: Preset, manifest: Path, device: str) -> dict[int, float]:
    bs = args.batch_size or preset.batch_size
    counts = sorted({min(n, bs) for n in args.decode_pipelines})  # the decoder caps at batch_size
    plans, warm = clip_plans(preset, manifest, device), clip_plans(preset, args._warm_manifest, device)
    rates = {}
    for n in counts:
        rates[n] = round(decode_only(args, preset, plans, warm, device, n), 2)
        print(f"  decode only, DALI {device}, {n} pipeline(s): {rates[n]} clips/s", flush=True)
    return rates


def clip_by_clip(args, preset: Preset, manifest: Path, device: str, pipelines: int) -> float | None:
    """With several clips per video: decode only, every clip on its own (the same-run baseline of
    decoding a video's clips together)."""
    if preset.clips_per_video == 1:
        return None
    plans, warm = clip_plans(preset, manifest, device), clip_plans(preset, args._warm_manifest, device)
    rate = round(decode_only(args, preset, plans, warm, device, pipelines, group_by_video=False), 2)
    print(f"  decode only, DALI {device}, {pipelines} pipeline(s), every clip on its own: {rate} clips/s", flush=True)
    return rate


def sweep_encoder(args, preset: Preset, tok: Path) -> dict[str, float]:
    rates = {}
    for fmt in args.encoder_memory_formats:
        rates[fmt] = round(encoder_only(args, preset, tok, args.encoder_iters, fmt), 2)
        print(f"  encoder only, {fmt}: {rates[fmt]} clips/s", flush=True)
    return rates


def full_runs(args, preset: Preset, tok: Path, manifest: Path, work: Path, device: str, chosen: dict) -> dict:
    """The full DALI pipeline (with the chosen count, or each count) and the PyAV baseline."""
    counts = sorted(chosen["decode_only"]) if args.full == "each" else [chosen["decode_pipelines"]]
    fmt = chosen["encoder_memory_format"]
    dali = {}
    for n in counts:
        dali[n] = breakdown(run_pipeline(args, preset, tok, manifest, work, "dali", device, n, fmt))
        print(f"  DALI {device} decode ({n} pipeline(s)) -> encoder ({fmt}): {dali[n]}", flush=True)
    pyav = breakdown(run_pipeline(args, preset, tok, manifest, work, "pyav", "cpu", 1, fmt))
    print(f"  PyAV cpu decode ({args.cpu_workers} threads) -> encoder ({fmt}): {pyav}", flush=True)
    return {"dali": dali, "pyav": pyav}


def summary_lines(r: dict, device: str) -> list[str]:
    """Every figure of a preset next to the PyAV baseline of the same run, with the ratio."""
    p = r["pyav_cpu"]["clips_per_s"]

    def row(label: str, rate: float, extra: str = "") -> str:
        ratio = f"{rate / p:6.2f}x PyAV" if p else "    n/a"
        return f"  {label:<52s} {rate:9.2f} clips/s {ratio}{extra}"

    lines = [row("PyAV cpu decode -> encoder (the baseline)", p)]
    lines += [row(f"decode only, DALI {device}, {n} pipeline(s)", v) for n, v in r["decode_only_clips_per_s"].items()]
    if r.get("decode_only_clip_by_clip_clips_per_s"):
        n = r["chosen"]["decode_pipelines"]
        lines.append(row(f"decode only, {n} pipeline(s), every clip on its own", r["decode_only_clip_by_clip_clips_per_s"]))
    lines += [row(f"encoder only, {f}", v) for f, v in r["encoder_only_by_memory_format"].items()]
    if r.get("decode_beside_busy_encoder"):
        b = r["decode_beside_busy_encoder"]
        lines.append(row("decode only beside a busy encoder", b["decode_clips_per_s"],
                         f"  (encoder meanwhile {b['encoder_clips_per_s']:.2f} clips/s)"))
    ceiling = r["encoder_only_clips_per_s"]
    for n, b in r["dali_full_by_pipelines"].items():
        d = b["clips_per_s"]
        lines.append(row(f"DALI {device} -> encoder, {n} pipeline(s), {r['chosen']['encoder_memory_format']}", d,
                         f"  (goal >= 3x) at {100 * d / ceiling:.0f}% of encoder-only" if ceiling else ""))
    return lines


def prepare(name: str, args, work: Path) -> tuple[Preset, Path, Path, str, dict]:
    """Sources, warm-up sources and tokenizer of a preset; returns (preset, manifest, tokenizer, DALI
    device, the result's header)."""
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
    header = {"preset": name, "clips": clips, "batch_size": bs, "source_codec": args.source_codec,
              "source_size": list(preset.source), "device": "cuda" if cuda else "cpu",
              "gpu": torch.cuda.get_device_name() if cuda else None, "deterministic": args.deterministic}
    return preset, manifest, tok, "gpu" if cuda else "cpu", header


def figures(decode: dict, encode: dict, chosen: dict, runs: dict, device: str) -> dict:
    """The result fields; the headline (``dali_<device>``, speedup) is the fastest full DALI run."""
    best_n = max(runs["dali"], key=lambda n: runs["dali"][n]["clips_per_s"])  # the only one unless --full each
    best, pyav = runs["dali"][best_n], runs["pyav"]
    d, p, ceiling = best["clips_per_s"], pyav["clips_per_s"], encode[chosen["encoder_memory_format"]]
    return {"decode_only_clips_per_s": decode, "encoder_only_by_memory_format": encode,
            "chosen": {k: v for k, v in chosen.items() if k != "decode_only"},
            "dali_full_by_pipelines": runs["dali"], "dali_full_pipelines": best_n, f"dali_{device}": best,
            "pyav_cpu": pyav, "encoder_only_clips_per_s": ceiling,
            "speedup_dali_vs_pyav": round(d / p, 2) if p else None,
            "dali_fraction_of_encoder_only": round(d / ceiling, 3) if ceiling else None}


def bench_preset(name: str, args, work: Path) -> dict:
    preset, manifest, tok, device, result = prepare(name, args, work)
    decode = sweep_decode(args, preset, manifest, device)
    encode = sweep_encoder(args, preset, tok)
    chosen = {"decode_pipelines": pick_pipelines(decode), "encoder_memory_format": max(encode, key=encode.get),
              "decode_only": decode}
    one_by_one = clip_by_clip(args, preset, manifest, device, chosen["decode_pipelines"])
    beside = decode_beside_encoder(args, preset, tok, manifest, device, chosen["decode_pipelines"],
                                   chosen["encoder_memory_format"]) if args.beside else None
    runs = full_runs(args, preset, tok, manifest, work, device, chosen)
    result.update(figures(decode, encode, chosen, runs, device))
    result["decode_beside_busy_encoder"] = beside
    result["clips_per_video"] = preset.clips_per_video
    result["decode_only_clip_by_clip_clips_per_s"] = one_by_one
    print(f"-- {name} summary (chosen: {chosen['decode_pipelines']} pipeline(s), "
          f"{chosen['encoder_memory_format']}) --", *summary_lines(result, device), sep="\n", flush=True)
    return result


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"pipeline counts must be >= 1, got {text!r}")
    return values


MEMORY_FORMAT_CHOICES = {"both": ["contiguous", "channels_last"], "contiguous": ["contiguous"],
                         "channels_last": ["channels_last"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[*PRESETS, "both", "all"], default="both",
                   help="both = 17x128 and 33x384x672; all = 17x128, ucf101 (the UCF-101 recipe's 4 clips per "
                        "video) and 33x384x672")
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
    p.add_argument("--decode-threads", type=int, default=4, help="DALI threads per pipeline (default 4)")
    p.add_argument("--decode-pipelines", type=int_list, default=[1, 2, 4, 8],
                   help="DALI pipeline counts to sweep, comma-separated (default 1,2,4,8; capped at the batch size)")
    p.add_argument("--encoder-memory-format", choices=list(MEMORY_FORMAT_CHOICES), default="both",
                   help="encoder layouts to time (default both; the faster feeds the full runs)")
    p.add_argument("--full", choices=["best", "each"], default="best",
                   help="full DALI runs: with the chosen pipeline count only (default), or with each count")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 4,
                   help="PyAV baseline decode threads (default: all cores)")
    p.add_argument("--probe-workers", type=int, default=8)
    p.add_argument("--encoder-iters", type=int, default=10, help="batches timed for encoder-only")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="allow cuDNN autotuned (non-deterministic) kernels; the shipped recipes are deterministic")
    p.add_argument("--no-beside", dest="beside", action="store_false",
                   help="skip the decode-beside-a-busy-encoder run (do the two stages overlap on this device?)")
    p.add_argument("--no-write", action="store_true", help="skip MDS writing (if mosaicml-streaming is missing)")
    p.add_argument("--out", default="", help="write the results JSON here (default: print only)")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    args.encoder_memory_formats = MEMORY_FORMAT_CHOICES[args.encoder_memory_format]
    if args.device == "cpu" and args.source_codec not in ("vp9",):
        print("note: DALI on CPU decodes only vp8/vp9/mjpeg; using --source-codec vp9")
        args.source_codec = "vp9"
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pretok_"))
    names = {"both": ["17x128", "33x384x672"], "all": ["17x128", "ucf101", "33x384x672"]}.get(args.preset, [args.preset])
    t0 = time.perf_counter()
    try:
        results = [bench_preset(n, args, work) for n in names]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps({"results": results, "torch": torch.__version__,
                       "wall_s": round(time.perf_counter() - t0, 1)}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
