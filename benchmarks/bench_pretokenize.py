"""Pre-tokenization throughput against its ceiling: the full pipeline (decode → encoder → shards written)
next to the encoder alone on resident frames, measured in the same run, per preset.

    python benchmarks/bench_pretokenize.py --preset all                   # GPU host: the three presets
    python benchmarks/bench_pretokenize.py --preset 17x128 --encoder-micro-batch 0,4 --profile-encoder
    python benchmarks/bench_pretokenize.py --preset 17x128 --beside-decode thread,process --decode-process both
    python benchmarks/bench_pretokenize.py --preset tiny --device cpu --clips 16   # CPU smoke run

Presets: ``17x128`` (320x240 sources of 40 frames, one clip each), ``ucf101`` (the sampling of
recipes/pretokenize/ucf101_17x128.yaml: 7 s sources at 25 fps, 4 clips of 17 frames at 8 fps per
video), ``33x384x672`` (720p sources, one clip each).

Per preset it prints FIRST, for every full run, clips/s as a fraction of the encoder alone (goal >= 0.9:
the encoder never waits for frames), then the ratio to the PyAV baseline of the same run, then the host
CPU cores the run kept busy (process CPU time / wall time, every thread: DALI's, PyAV's, the encoder's).
What it measures, in order:
 1. the encoder alone on resident random frames: per --encoder-memory-format (the faster is used), per
    encoder setup of the grid --encoder-micro-batch x --encoder-compile, and at --encoder-batch-sizes;
 2. decode alone: DALI (NVDEC on a GPU host) per --decode-pipelines count (the smallest count within 5%
    of the fastest is chosen; with several clips per video also every clip on its own);
 3. decode beside a busy encoder: the production decoder lanes (the chosen pipeline count) decode alone,
    then while the encoder runs back to back on another thread, per overlap setup (the grid above x
    --decode-stream-priority) x --beside-decode (lanes as threads of this process, or in a decode process
    with its own CUDA context) x --beside-encoder-stream (the encoder's launches on the legacy default
    stream, or on a non-blocking one): do the two stages overlap on this device or take turns, and does
    a separate context or stream change that? (--no-beside skips it);
 4. full runs through the production code (`data_prep.pretokenize.pipeline.Pretokenizer`, shards
    written unless --no-write): DALI with the chosen pipeline count (--full each: every count) once per
    overlap setup, --decode-process setting (the decoders in this process or in a decode process) and
    --prefetch-batches depth (batches in flight through the decoders ahead of the encoder);
    each --cpu-mix of DALI CPU pipelines and PyAV decoders (frames decoded on the host,
    the route that leaves the GPU to the encoder; DALI's CPU decoder needs --source-codec vp9); and the
    PyAV baseline (--cpu-workers PyAV decoders);
 5. with --profile-encoder, where the encoder's GPU time goes (torch.profiler over eager batches: conv /
    GEMM kernels, norms, layout copies and permutes, elementwise, per phase encoder / quantizer / copy to
    host).

Source videos are synthetic (a moving texture) encoded with --source-codec at the preset's size; a few
unique files are repeated to reach --clips (page cache helps every decoder alike). The tokenizer is
random-init unless --tokenizer is given (throughput does not depend on the weights). Needs torch, PyAV,
nvidia-dali, and mosaicml-streaming unless --no-write. Figures and their history: docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from data_prep.pretokenize.config import PretokenizeConfig  # noqa: E402

PREFETCH_DEFAULT = PretokenizeConfig.__dataclass_fields__["prefetch_batches"].default

@dataclasses.dataclass(frozen=True)
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


@dataclasses.dataclass(frozen=True)
class EncoderSetup:
    """How the encoder runs: ``micro_batch`` clips per launch (0: the whole batch) and torch.compile."""

    micro_batch: int = 0
    compile: bool = False

    def label(self) -> str:
        return (f"{self.micro_batch}-clip launches" if self.micro_batch else "whole-batch launches") + \
            (", compiled" if self.compile else "")

    def knobs(self, batch_size: int) -> dict:
        # 0 is the whole batch, set explicitly: the knob's auto is 4-clip launches with NVDEC decode
        return {"encoder_micro_batch": self.micro_batch or batch_size, "encoder_compile": self.compile}


@dataclasses.dataclass(frozen=True)
class Route:
    """One full-run configuration: which decoders feed the encoder, and how the encoder runs."""

    decode_device: str                  # gpu (NVDEC) or cpu
    pipelines: int                      # DALI pipelines (0: none)
    pyav_decoders: int = 0
    encoder: EncoderSetup = EncoderSetup()
    priority: int = 0                   # decode_stream_priority (NVDEC)
    decode_process: bool = False        # the decoders in a process of their own
    prefetch: int = 2                   # prefetch_batches: batches in flight through the decoders

    def label(self) -> str:
        parts = []
        if self.pipelines:
            parts.append(f"DALI {self.decode_device} x{self.pipelines}")
        if self.pyav_decoders:
            parts.append(f"PyAV x{self.pyav_decoders}")
        text = " + ".join(parts) + (" in a decode process" if self.decode_process else "") + f", {self.encoder.label()}"
        text += f", decode priority {self.priority}" if self.priority else ""
        return text + (f", prefetch {self.prefetch}" if self.prefetch != PREFETCH_DEFAULT else "")

    def knobs(self, batch_size: int) -> dict:
        dali = self.pipelines > 0
        return {"decoder": "dali" if dali else "pyav", "decode_device": self.decode_device,
                "decode_pipelines": self.pipelines if dali else 0, "pyav_decoders": self.pyav_decoders,
                "decode_stream_priority": self.priority, "decode_process": self.decode_process,
                "prefetch_batches": self.prefetch, **self.encoder.knobs(batch_size)}


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


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def cpu_seconds() -> float:
    """CPU time of this process so far, every thread (DALI's and PyAV's decode threads when in-process),
    plus that of its children that have exited (a decode process, once closed)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def child_cpu_seconds(pid: int | None) -> float:
    """CPU time so far of a running child (Linux /proc), every thread; 0 without one."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def run_pipeline(args, preset: Preset, tok: Path, manifest: Path, work: Path, route: Route, memory_format: str) -> dict:
    """One full pre-tokenization over ``manifest`` (after a warm-up run on other files): its figures."""
    from data_prep.pretokenize import writer
    from data_prep.pretokenize.pipeline import Pretokenizer
    from data_prep.pretokenize.worker import Worker
    from tokenizer import load_tokenizer
    if args.no_write:
        writer._mds_writer = lambda: NullWriter
    for attempt in ("warmup", "measured"):
        out = work / f"run-{attempt}"
        shutil.rmtree(out, ignore_errors=True)
        threads = args.decode_threads if route.pipelines else 1
        bs = args.batch_size or preset.batch_size
        cfg = PretokenizeConfig(
            tokenizer=str(tok), input_manifest=str(manifest if attempt == "measured" else args._warm_manifest),
            output_dir=str(out), clips=preset.sampling(), batch_size=bs,
            device=args.device, decode_threads=threads, encoder_memory_format=memory_format,
            probe_workers=args.probe_workers, num_partitions=1, latent_dtype="bfloat16",
            deterministic=args.deterministic, progress_bar=False, **route.knobs(bs))
        pretok = Pretokenizer(cfg, Worker(0, 1), load_tokenizer)
        pretok.stream.lanes()  # a decode process starts (imports torch and DALI) before the clock, as threads do
        child = pretok.stream.decode_process
        # the decode process's CPU counts from here: it joins RUSAGE_CHILDREN whole when it exits in run()
        cpu0, t0 = cpu_seconds() + child_cpu_seconds(child and child.pid), time.perf_counter()
        stats = pretok.run()[0]
        wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
        del pretok
        handoff = [json.loads(f.read_text()).get("decode_process_handoff_s") for f in (out / "logs").glob("*.json")]
        shutil.rmtree(out, ignore_errors=True)
        release_memory()  # the DALI pipelines and the encoder's graph, before the next run builds its own
    return {"clips": stats.clips, "rejects": stats.rejects, "prefetch_batches": cfg.prefetch_batches,
            "clips_per_s": round(stats.clips_per_s, 2),
            "host_cores_busy": round(cpu / wall, 2), "total_s": round(stats.total_s, 3),
            "decode_lane_s": round(stats.decode_s, 3), "encoder_waited_for_frames_s": round(stats.wait_s, 3),
            "encode_s": round(stats.encode_s, 3), "write_s": round(stats.write_s, 3),
            **({"decode_process_handoff_s": handoff[0]} if handoff and handoff[0] else {})}


def clip_plans(preset: Preset, manifest: Path, device: str) -> list:
    """The ClipPlans a pre-tokenization run decodes for ``manifest`` (the preset's clips per row)."""
    from data_prep.manifest import read_manifest
    from data_prep.video import plan_clips, probe_video
    return [p for r in read_manifest(manifest) for p in plan_clips(probe_video(r.path, device), preset.sampling())]


def decode_batches(decoder, plans: list, batch_size: int) -> None:
    """Decode ``plans`` batch by batch (GPU: on a side stream of the decoder's priority, synchronised)."""
    stream = torch.cuda.Stream(priority=decoder.stream_priority) if decoder.device == "gpu" else None
    for i in range(0, len(plans), batch_size):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            results = decoder.decode(plans[i:i + batch_size])
        if stream is not None:
            stream.synchronize()
        failed = [r for r in results if not isinstance(r, torch.Tensor)]
        if failed:
            raise RuntimeError(f"{len(failed)} clips failed to decode, first: {failed[0].reason}")


def decode_only(args, preset: Preset, plans: list, warm_plans: list, device: str, pipelines: int,
                group_by_video: bool = True, priority: int = 0) -> float:
    """Clips/s of DALI decoding alone with ``pipelines`` pipelines; ``group_by_video=False`` decodes every
    clip on its own (the decoder before session 4)."""
    from data_prep.video import DaliClipDecoder
    bs = args.batch_size or preset.batch_size
    decoder = DaliClipDecoder(height=preset.height, width=preset.width, device=device, batch_size=bs,
                              num_threads=args.decode_threads, pipelines=pipelines, group_by_video=group_by_video,
                              stream_priority=priority)
    decode_batches(decoder, warm_plans, bs)  # builds every pipeline
    t0 = time.perf_counter()
    decode_batches(decoder, plans, bs)
    rate = len(plans) / (time.perf_counter() - t0)
    del decoder
    release_memory()
    return rate


def make_encoder(args, preset: Preset, tok: Path, memory_format: str, setup: EncoderSetup = EncoderSetup(),
                 batch_size: int = 0, cuda_graph: bool = True):
    """The production ClipEncoder (its CUDA graph captured as in the full runs) and one batch of resident
    random frames."""
    from data_prep.pretokenize.encoder import ClipEncoder
    from tokenizer import load_tokenizer
    bs = batch_size or args.batch_size or preset.batch_size
    cfg = PretokenizeConfig(tokenizer=str(tok), input_manifest="-", output_dir="-", latent_dtype="bfloat16",
                            clips=preset.sampling(), batch_size=bs, deterministic=args.deterministic,
                            encoder_memory_format=memory_format, encoder_cuda_graph=cuda_graph, **setup.knobs(bs))
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
def encoder_only(args, preset: Preset, tok: Path, memory_format: str, setup: EncoderSetup = EncoderSetup(),
                 batch_size: int = 0) -> float:
    """Clips/s of encode + quantize alone on resident random frames (the ceiling of the pipeline)."""
    enc, frames = make_encoder(args, preset, tok, memory_format, setup, batch_size)
    sync = torch.cuda.synchronize if enc.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(args.encoder_iters):
        enc.encode(frames, ["x"] * len(frames))
    sync()
    rate = args.encoder_iters * len(frames) / (time.perf_counter() - t0)
    del enc, frames
    release_memory()
    return rate


@dataclasses.dataclass(frozen=True)
class BesideSetup:
    """One run of decode beside a busy encoder: how the encoder runs, where decode runs, on which stream
    the encoder's launches are queued."""

    encoder: EncoderSetup = EncoderSetup()
    priority: int = 0                   # decode_stream_priority
    decode_in: str = "thread"           # thread: decoder lanes in this process; process: a decode process
    encoder_stream: str = "default"     # default: the legacy default stream; side: a non-blocking stream

    def label(self) -> str:
        text = self.encoder.label() + (f", decode priority {self.priority}" if self.priority else "")
        text += ", decode in a separate process" if self.decode_in == "process" else ""
        return text + (", encoder on a non-blocking stream" if self.encoder_stream == "side" else "")


def clip_jobs(preset: Preset, manifest: Path, device: str) -> tuple[list, list[str]]:
    """The ClipPlans of ``manifest`` and each one's codec (which decoder lanes take it)."""
    from data_prep.manifest import read_manifest
    from data_prep.video import plan_clips, probe_video
    plans, codecs = [], []
    for r in read_manifest(manifest):
        info = probe_video(r.path, device)
        for plan in plan_clips(info, preset.sampling()):
            plans.append(plan)
            codecs.append(info.codec)
    return plans, codecs


def lanes_decode_rate(lanes, plans: list, codecs: list[str], batch_size: int, depth: int = 2) -> float:
    """Clips/s of decoder lanes (threads or a decode process) over ``plans``, ``depth`` batches in flight,
    as the clip stream keeps them; every clip must decode."""
    def finish(ticket) -> None:
        results, _ = lanes.result(ticket)
        failed = [r for r in results if not isinstance(r, torch.Tensor)]
        if failed:
            raise RuntimeError(f"{len(failed)} clips failed to decode, first: {failed[0].reason}")

    stream = getattr(lanes, "stream", None)  # a decode process's receiving stream (see DecodeProcess.stream)
    t0 = time.perf_counter()
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        in_flight: deque = deque()
        for i in range(0, len(plans), batch_size):
            in_flight.append(lanes.submit(plans[i:i + batch_size], codecs[i:i + batch_size]))
            if len(in_flight) >= depth:
                finish(in_flight.popleft())
        while in_flight:
            finish(in_flight.popleft())
    return len(plans) / (time.perf_counter() - t0)


def start_lanes(args, preset: Preset, device: str, pipelines: int, beside: BesideSetup):
    """The production decoder lanes (NVDEC pipelines as in a full run), as threads or in a decode process."""
    from data_prep.pretokenize.clip_stream import decoder_lanes
    from data_prep.pretokenize.decode_process import DecodeProcess
    from data_prep.pretokenize.decoders import DecoderLanes
    cfg = PretokenizeConfig(tokenizer="-", input_manifest="-", output_dir="-", clips=preset.sampling(),
                            batch_size=args.batch_size or preset.batch_size, decode_device=device,
                            decode_pipelines=pipelines, decode_threads=args.decode_threads,
                            decode_stream_priority=beside.priority, decode_process=beside.decode_in == "process")
    specs = decoder_lanes(cfg, device, 0)
    return DecodeProcess(cfg, device, 0, specs) if cfg.decode_process else DecoderLanes(specs)


def decode_beside_encoder(args, preset: Preset, tok: Path, manifest: Path, device: str, pipelines: int,
                          memory_format: str, beside: BesideSetup) -> dict[str, float]:
    """Decode alone, then decode while the encoder encodes resident frames back to back on another thread:
    the decode rates and the encoder's meanwhile. Next to encoder-only this says whether the two stages
    overlap on this device or take turns (session 7, H100: NVDEC decode fell from 96 to 6 clips/s beside
    the whole-batch encoder), and whether a decode process (its own CUDA context) or the encoder on a
    non-blocking stream (no legacy-default-stream syncs) changes that."""
    import threading
    bs = args.batch_size or preset.batch_size
    enc, frames = make_encoder(args, preset, tok, memory_format, beside.encoder)
    plans, codecs = clip_jobs(preset, manifest, device)
    plans, codecs = plans[:args.beside_clips or len(plans)], codecs[:args.beside_clips or len(plans)]
    lanes = start_lanes(args, preset, device, pipelines, beside)
    stop, batches, failure = threading.Event(), [0], []

    def encode_forever(encoder, batch):
        try:
            side = None
            if encoder.device.type == "cuda":
                torch.cuda.set_device(encoder.device.index or 0)
                side = torch.cuda.Stream() if beside.encoder_stream == "side" else None  # cudaStreamNonBlocking
            with torch.no_grad(), torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                while True:  # at least one batch; the rate's clock stops when the last one has ended
                    encoder.encode(batch, ["x"] * len(batch))  # ends in a host copy: synchronised per batch
                    batches[0] += 1
                    if stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - re-raised below: a dead encoder is no measurement
            failure.append(e)

    try:
        warm_plans, warm_codecs = clip_jobs(preset, args._warm_manifest, device)
        lanes_decode_rate(lanes, warm_plans, warm_codecs, bs)  # builds every lane's DALI pipeline
        handoff0 = dict(getattr(lanes, "handoff_s", {}))
        alone = lanes_decode_rate(lanes, plans, codecs, bs)
        handoff = {k: round(v - handoff0[k], 3) for k, v in getattr(lanes, "handoff_s", {}).items()}
        thread = threading.Thread(target=encode_forever, args=(enc, frames), daemon=True, name="bench-encoder")
        t0 = time.perf_counter()
        thread.start()
        try:
            decode = lanes_decode_rate(lanes, plans, codecs, bs)
        finally:
            stop.set()
            thread.join()
        encode = batches[0] * len(frames) / (time.perf_counter() - t0)
    finally:
        lanes.close()
    if failure:
        raise RuntimeError("the busy encoder beside decode failed") from failure[0]
    del enc, frames
    release_memory()
    return {"decode_alone_clips_per_s": round(alone, 2), "decode_clips_per_s": round(decode, 2),
            "encoder_clips_per_s": round(encode, 2),
            **({"decode_alone_process_handoff_s": handoff} if handoff else {})}


# -- where the encoder's time goes -------------------------------------------------------------------

KERNEL_CATEGORIES = (  # first match wins; names of CUDA kernels (lower case), or of aten ops on CPU
    ("norm", ("group_norm", "groupnorm", "batch_norm", "layer_norm", "moments", "welford", "fusedparams")),
    ("conv / GEMM", ("conv", "fprop", "implicit", "xmma", "cutlass", "gemm", "cudnn", "winograd", "mkldnn",
                     "matmul", "addmm", "bmm")),
    ("layout copy / permute / cat / pad", ("copy", "transpose", "permute", "nchw", "nhwc", "cat", "pad",
                                           "contiguous", "clone", "stack")),
    ("elementwise / activation", ("elementwise", "silu", "sigmoid", "mul", "add", "sub", "div", "vectorized",
                                  "reduce", "sign", "where", "interpolate", "upsample", "round")),
)


def kernel_category(name: str) -> str:
    low = name.lower()
    return next((cat for cat, keys in KERNEL_CATEGORIES if any(k in low for k in keys)), "other")


def _phase(event) -> str:
    from data_prep.pretokenize.encoder import PHASES
    while event is not None:
        if event.name in PHASES:
            return event.name.removeprefix("pretokenize.")
        event = event.cpu_parent
    return "outside"


def time_units(events, cuda: bool):
    """(name, microseconds, phase) of every CUDA kernel (by the op that launched it), or on CPU of every
    aten op's own time."""
    for e in events:
        if cuda:
            for k in e.kernels:
                yield k.name, k.duration, _phase(e)
        elif e.name.startswith("aten::"):
            yield e.name, e.self_cpu_time_total, _phase(e)


def encoder_breakdown(units, batches: int) -> dict:
    """Milliseconds per batch by phase and by kernel category (and the categories of the encoder phase)."""
    by_phase, by_category, encoder_only = {}, {}, {}
    for name, us, phase in units:
        cat = kernel_category(name)
        by_phase[phase] = by_phase.get(phase, 0.0) + us
        by_category[cat] = by_category.get(cat, 0.0) + us
        if phase == "encoder":
            encoder_only[cat] = encoder_only.get(cat, 0.0) + us

    def per_batch(d):
        return {k: round(v / 1000 / batches, 3) for k, v in sorted(d.items(), key=lambda kv: -kv[1])}
    return {"ms_per_batch_by_phase": per_batch(by_phase), "ms_per_batch_by_category": per_batch(by_category),
            "encoder_phase_ms_per_batch_by_category": per_batch(encoder_only)}


@torch.no_grad()
def profile_encoder(args, preset: Preset, tok: Path, memory_format: str, setup: EncoderSetup) -> dict:
    """torch.profiler over ``--profile-batches`` eager batches (a CUDA graph replay hides its kernels'
    names; the graph replays the same kernels)."""
    from torch.profiler import ProfilerActivity, profile
    enc, frames = make_encoder(args, preset, tok, memory_format, setup, cuda_graph=False)
    cuda = enc.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(args.profile_batches):
            enc.encode(frames, ["x"] * len(frames))
        if cuda:
            torch.cuda.synchronize()
    result = encoder_breakdown(time_units(prof.events(), cuda), args.profile_batches)
    result["timing"] = "CUDA kernel time" if cuda else "CPU op self time"
    del enc, frames, prof
    release_memory()
    return result


def breakdown_lines(p: dict) -> list[str]:
    total = sum(p["ms_per_batch_by_category"].values()) or 1.0
    lines = [f"  encoder profile ({p['timing']}, ms per batch): by phase " +
             ", ".join(f"{k} {v:.2f}" for k, v in p["ms_per_batch_by_phase"].items())]
    lines += [f"    {k:<36s} {v:9.2f} ms  {100 * v / total:5.1f}%" for k, v in p["ms_per_batch_by_category"].items()]
    return lines


# -- one preset ---------------------------------------------------------------------------------------

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
              "gpu": torch.cuda.get_device_name() if cuda else None, "host_cores": os.cpu_count(),
              "deterministic": args.deterministic, "shards_written": not args.no_write,
              "clips_per_video": preset.clips_per_video}
    return preset, manifest, tok, "gpu" if cuda else "cpu", header


def sweep_encoder(args, preset: Preset, tok: Path) -> tuple[str, dict[str, float]]:
    """Encoder alone per memory format, then per encoder setup and extra batch size in the chosen one."""
    rates = {}
    for fmt in args.encoder_memory_formats:
        rates[fmt] = round(encoder_only(args, preset, tok, fmt), 2)
        print(f"  encoder only, {fmt}: {rates[fmt]} clips/s", flush=True)
    fmt = max((f for f in rates), key=rates.get)
    for setup in dict.fromkeys(s for s in args.encoder_setups if s != EncoderSetup()):
        key = f"{fmt}, {setup.label()}"
        rates[key] = round(encoder_only(args, preset, tok, fmt, setup), 2)
        print(f"  encoder only, {key}: {rates[key]} clips/s", flush=True)
    for bs in args.encoder_batch_sizes:
        key = f"{fmt}, batch {bs}"
        rates[key] = round(encoder_only(args, preset, tok, fmt, batch_size=bs), 2)
        print(f"  encoder only, {key}: {rates[key]} clips/s", flush=True)
    return fmt, rates


def encoder_rate(rates: dict, fmt: str, setup: EncoderSetup) -> float:
    return rates[fmt] if setup == EncoderSetup() else rates[f"{fmt}, {setup.label()}"]


def sweep_decode(args, preset: Preset, manifest: Path, device: str) -> tuple[dict[int, float], float | None]:
    """DALI decode alone per pipeline count; with several clips per video also every clip on its own."""
    bs = args.batch_size or preset.batch_size
    counts = sorted({min(n, bs) for n in args.decode_pipelines})  # the decoder caps at batch_size
    plans, warm = clip_plans(preset, manifest, device), clip_plans(preset, args._warm_manifest, device)
    rates = {}
    for n in counts:
        rates[n] = round(decode_only(args, preset, plans, warm, device, n), 2)
        print(f"  decode only, DALI {device}, {n} pipeline(s): {rates[n]} clips/s", flush=True)
    alone = None
    if preset.clips_per_video > 1:
        n = pick_pipelines(rates)
        alone = round(decode_only(args, preset, plans, warm, device, n, group_by_video=False), 2)
        print(f"  decode only, DALI {device}, {n} pipeline(s), every clip on its own: {alone} clips/s", flush=True)
    return rates, alone


def auto_pipelines(args, preset: Preset, device: str) -> int:
    """What decode_pipelines=0 (auto) gives in production, for runs without the decode-alone sweep."""
    from data_prep.pretokenize.clip_stream import GPU_DECODE_PIPELINES
    return min(GPU_DECODE_PIPELINES if device == "gpu" else 1, args.batch_size or preset.batch_size)


def pick_pipelines(rates: dict[int, float]) -> int:
    """The fewest pipelines within 5% of the fastest decode (fewer threads and NVDEC sessions)."""
    best = max(rates.values())
    return min(n for n, r in rates.items() if r >= 0.95 * best)


def sweep_beside(args, preset: Preset, tok: Path, manifest: Path, device: str, pipelines: int, fmt: str) -> dict:
    out = {}
    for setup, priority in args.overlap_setups:
        for decode_in in args.beside_decode:
            for stream in args.beside_encoder_stream:
                beside = BesideSetup(setup, priority, decode_in, stream)
                label = beside.label()
                out[label] = decode_beside_encoder(args, preset, tok, manifest, device, pipelines, fmt, beside)
                print(f"  decode beside a busy encoder ({label}), {pipelines} pipeline(s): {out[label]}", flush=True)
    return out


def routes(args, device: str, pipelines: list[int]) -> list[Route]:
    """The full runs: DALI per pipeline count x overlap setup x decode in a thread / in a process x prefetch
    depth, each CPU mix, and the PyAV baseline last."""
    out = [Route(device, n, encoder=setup, priority=prio, decode_process=dp, prefetch=depth) for n in pipelines
           for setup, prio in args.overlap_setups for dp in args.decode_processes for depth in args.prefetch_batches]
    out += [Route("cpu", dali, pyav) for dali, pyav in args.cpu_mix]
    out.append(Route("cpu", 0, args.cpu_workers))  # the baseline: PyAV decoders on every core
    return out


def full_runs(args, preset: Preset, tok: Path, manifest: Path, work: Path, fmt: str, encoder_rates: dict,
              all_routes: list[Route]) -> dict[str, dict]:
    runs = {}
    for route in all_routes:
        label = route.label()
        r = run_pipeline(args, preset, tok, manifest, work, route, fmt)
        ceiling = encoder_rate(encoder_rates, fmt, route.encoder)
        r["encoder_only_clips_per_s"] = ceiling
        r["fraction_of_encoder_only"] = round(r["clips_per_s"] / ceiling, 3) if ceiling else None
        runs[label] = r
        print(f"  full run, {label}: {r}", flush=True)
    baseline = runs[all_routes[-1].label()]["clips_per_s"]
    for r in runs.values():
        r["vs_pyav"] = round(r["clips_per_s"] / baseline, 2) if baseline else None
    return runs


def summary_lines(r: dict) -> list[str]:
    """The headline (the best full run against the encoder alone, then PyAV, then host cores), then every
    full run the same way, then the stage-alone figures."""
    runs, best = r["full_runs"], r["best_full_run"]
    lines = ["  no full runs (--full none)"]
    if best is not None:
        b = runs[best]
        lines = [f"  HEADLINE {best}: {b['fraction_of_encoder_only']:.3f} of the encoder alone (goal >= 0.9) | "
                 f"{b['vs_pyav']:.2f}x the PyAV baseline | {b['host_cores_busy']:.1f} host cores busy",
                 f"  {'full run (shards written)' if r['shards_written'] else 'full run (no write)':<58s} "
                 f"{'/encoder':>9s} {'/PyAV':>7s} {'cores':>6s} {'clips/s':>9s} {'waited s':>9s}"]
    for label, x in runs.items():
        lines.append(f"  {label:<58s} {x['fraction_of_encoder_only']:9.3f} {x['vs_pyav']:7.2f} "
                     f"{x['host_cores_busy']:6.1f} {x['clips_per_s']:9.2f} {x['encoder_waited_for_frames_s']:9.2f}")
    lines += [f"  encoder only, {k}: {v:.2f} clips/s" for k, v in r["encoder_only"].items()]
    lines += [f"  decode only, DALI, {n} pipeline(s): {v:.2f} clips/s" for n, v in r["decode_only_clips_per_s"].items()]
    if r.get("decode_only_clip_by_clip_clips_per_s"):
        lines.append(f"  decode only, every clip on its own: {r['decode_only_clip_by_clip_clips_per_s']:.2f} clips/s")
    for label, x in (r.get("decode_beside_busy_encoder") or {}).items():
        lines.append(f"  decode beside a busy encoder ({label}): decode {x['decode_clips_per_s']:.2f} "
                     f"(alone {x['decode_alone_clips_per_s']:.2f}), encoder meanwhile {x['encoder_clips_per_s']:.2f} "
                     f"clips/s")
    if r.get("encoder_profile"):
        lines += breakdown_lines(r["encoder_profile"])
    return lines


def bench_preset(name: str, args, work: Path) -> dict:
    preset, manifest, tok, device, result = prepare(name, args, work)
    fmt, enc = sweep_encoder(args, preset, tok)
    decode, alone = sweep_decode(args, preset, manifest, device) if args.decode_pipelines else ({}, None)
    chosen = pick_pipelines(decode) if decode else auto_pipelines(args, preset, device)
    pipelines = sorted(decode) if args.full == "each" and decode else [chosen]
    beside = sweep_beside(args, preset, tok, manifest, device, pipelines[0], fmt) if args.beside else None
    runs = {}
    if args.full != "none":
        runs = full_runs(args, preset, tok, manifest, work, fmt, enc, routes(args, device, pipelines))
    best = max(runs, key=lambda k: runs[k]["clips_per_s"]) if runs else None
    headline = runs[best] if runs else {}
    result.update({"encoder_memory_format": fmt, "encoder_only": enc, "encoder_only_clips_per_s": enc[fmt],
                   "decode_only_clips_per_s": decode, "decode_only_clip_by_clip_clips_per_s": alone,
                   "decode_pipelines_chosen": pipelines[0], "decode_beside_busy_encoder": beside,
                   "full_runs": runs, "best_full_run": best,
                   "pyav_cpu": runs.get(routes(args, device, [])[-1].label()),
                   "fraction_of_encoder_only": headline.get("fraction_of_encoder_only"),
                   "speedup_vs_pyav": headline.get("vs_pyav"), "host_cores_busy": headline.get("host_cores_busy")})
    result["encoder_profile"] = None
    if args.profile_encoder:
        result["encoder_profile"] = profile_encoder(args, preset, tok, fmt, EncoderSetup())
    print(f"-- {name} summary --", *summary_lines(result), sep="\n", flush=True)
    return result


# -- command line -------------------------------------------------------------------------------------

def int_list(text: str, least: int = 1, what: str = "pipeline counts") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if values and min(values) < least:
        raise argparse.ArgumentTypeError(f"{what} must be >= {least}, got {text!r}")
    return list(dict.fromkeys(values))


def choice_list(text: str, choices: tuple[str, ...]) -> list[str]:
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values or any(v not in choices for v in values):
        raise argparse.ArgumentTypeError(f"expected a comma-separated subset of {', '.join(choices)}, got {text!r}")
    return values


def priority_list(text: str) -> list[int]:
    values = int_list(text, least=-(1 << 30), what="stream priorities")
    if not values or max(values) > 0:
        raise argparse.ArgumentTypeError(f"stream priorities must be <= 0 (lower runs first), got {text!r}")
    return values


def mix_list(text: str) -> list[tuple[int, int]]:
    """``P:M,P:M``: DALI CPU pipelines : PyAV decoders."""
    try:
        mixes = [tuple(int(x) for x in part.split(":")) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P:M pairs (DALI CPU pipelines:PyAV decoders), got {text!r}") \
            from None
    if any(len(m) != 2 or min(m) < 0 or sum(m) == 0 for m in mixes):
        raise argparse.ArgumentTypeError(f"expected P:M pairs of counts >= 0, not both 0, got {text!r}")
    return mixes


MEMORY_FORMAT_CHOICES = {"both": ["contiguous", "channels_last"], "contiguous": ["contiguous"],
                         "channels_last": ["channels_last"]}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=[*PRESETS, "both", "all"], default="all",
                   help="all (default) = 17x128, ucf101 (the UCF-101 recipe's 4 clips per video) and 33x384x672, "
                        "every preset the >= 0.9 goal is judged on; both = 17x128 and 33x384x672")
    p.add_argument("--clips", type=int, default=0, help="clips per preset (default: the preset's)")
    p.add_argument("--batch-size", type=int, default=0, help="clips per batch (default: the preset's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="encoder device")
    p.add_argument("--source-codec", choices=["h264", "hevc", "vp9", "mpeg4"], default="h264",
                   help="codec of the synthetic sources (default h264; DALI's CPU decoder needs vp9)")
    p.add_argument("--unique-videos", type=int, default=8, help="distinct source files (default 8)")
    p.add_argument("--tokenizer", default="", help="tokenizer dir (default: random init, see --base-channels)")
    p.add_argument("--base-channels", type=int, default=64, help="random tokenizer width (default 64)")
    p.add_argument("--res-blocks", type=int, default=2, help="random tokenizer res blocks per level (default 2)")
    p.add_argument("--latent-dim", type=int, default=32, help="random tokenizer bits per token (default 32)")
    p.add_argument("--decode-threads", type=int, default=4, help="host threads per DALI pipeline (default 4)")
    p.add_argument("--decode-pipelines", type=lambda t: int_list(t), default=[1, 2, 4, 8],
                   help="DALI pipeline counts for decode alone, comma-separated (default 1,2,4,8; capped at the "
                        "batch size); one value skips the choice, an empty string skips decode alone")
    p.add_argument("--encoder-memory-format", choices=list(MEMORY_FORMAT_CHOICES), default="both",
                   help="encoder layouts to time (default both; the faster feeds the full runs)")
    p.add_argument("--encoder-micro-batch", type=lambda t: int_list(t, 0, "micro-batch sizes"), default=[0],
                   help="clips per encoder launch to try, comma-separated (0 = the whole batch, the default)")
    p.add_argument("--encoder-compile", choices=["off", "on", "both"], default="off",
                   help="torch.compile the encoder: off (default), on, or both")
    p.add_argument("--decode-stream-priority", type=priority_list, default=[0],
                   help="CUDA stream priorities of NVDEC decode to try, comma-separated, <= 0 (default 0)")
    p.add_argument("--prefetch-batches", type=lambda t: int_list(t, 1, "prefetch depths"), default=[PREFETCH_DEFAULT],
                   help="prefetch_batches of the full DALI runs, comma-separated: batches in flight through the "
                        f"decoders ahead of the encoder (default {PREFETCH_DEFAULT}, the shipped knob's default; DALI's own "
                        "queue stays 1, see docs/pretokenize.md)")
    p.add_argument("--encoder-batch-sizes", type=lambda t: int_list(t, 1, "batch sizes"), default=[],
                   help="extra batch sizes for the encoder alone (larger batches: cheaper per clip?)")
    p.add_argument("--full", choices=["best", "each", "none"], default="best",
                   help="full DALI runs: with the chosen pipeline count only (default), with each count, or none "
                        "(encoder and decode studies only)")
    p.add_argument("--cpu-mix", type=mix_list, default=[],
                   help="host-decoding full runs, P:M = P DALI CPU pipelines (VP8/VP9/MJPEG sources) + M PyAV "
                        "decoders, comma-separated (e.g. 2:8,0:16); the PyAV baseline always runs")
    p.add_argument("--cpu-workers", type=int, default=os.cpu_count() or 4,
                   help="PyAV decoders of the baseline (default: all cores)")
    p.add_argument("--probe-workers", type=int, default=8)
    p.add_argument("--encoder-iters", type=int, default=10, help="batches timed for encoder-only")
    p.add_argument("--profile-encoder", action="store_true",
                   help="also profile the encoder: GPU time by kernel category and phase")
    p.add_argument("--profile-batches", type=int, default=3, help="batches under the profiler (default 3)")
    p.add_argument("--no-deterministic", dest="deterministic", action="store_false",
                   help="allow cuDNN autotuned (non-deterministic) kernels; the shipped recipes are deterministic")
    p.add_argument("--no-beside", dest="beside", action="store_false",
                   help="skip the decode-beside-a-busy-encoder runs (do the two stages overlap on this device?)")
    p.add_argument("--beside-decode", type=lambda t: choice_list(t, ("thread", "process")), default=["thread"],
                   help="where decode runs beside the busy encoder, comma-separated: thread (decoder lanes in this "
                        "process, the default) and/or process (a decode process: its own CUDA context)")
    p.add_argument("--beside-encoder-stream", type=lambda t: choice_list(t, ("default", "side")), default=["default"],
                   help="the busy encoder's CUDA stream, comma-separated: default (the legacy default stream, as "
                        "in a full run) and/or side (a non-blocking stream: no implicit syncs with other streams)")
    p.add_argument("--decode-process", choices=["off", "on", "both"], default="off",
                   help="full NVDEC runs with the decoders in a decode process (decode_process): off (default), "
                        "on, or both")
    p.add_argument("--beside-clips", type=int, default=0,
                   help="clips decoded beside the busy encoder (default 0: all of the preset's)")
    p.add_argument("--no-write", action="store_true", help="skip MDS writing (if mosaicml-streaming is missing)")
    p.add_argument("--out", default="", help="write the results JSON here (default: print only)")
    p.add_argument("--work-dir", default="", help="scratch directory (default: a temporary one, removed)")
    args = p.parse_args(argv)
    args.encoder_memory_formats = MEMORY_FORMAT_CHOICES[args.encoder_memory_format]
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.encoder_compile]
    args.encoder_setups = [EncoderSetup(mb, c) for mb in args.encoder_micro_batch for c in compiles]
    args.overlap_setups = [(s, prio) for s in args.encoder_setups for prio in args.decode_stream_priority]
    args.decode_processes = {"off": [False], "on": [True], "both": [False, True]}[args.decode_process]
    if (args.device == "cpu" or not torch.cuda.is_available()) and "side" in args.beside_encoder_stream:
        print("note: no CUDA, so no encoder stream to choose; --beside-encoder-stream default")
        args.beside_encoder_stream = ["default"]
    if args.device == "cpu" and args.source_codec != "vp9":
        print("note: DALI on CPU decodes only vp8/vp9/mjpeg; using --source-codec vp9")
        args.source_codec = "vp9"
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_pretok_"))
    groups = {"both": ["17x128", "33x384x672"], "all": ["17x128", "ucf101", "33x384x672"]}
    names = groups.get(args.preset, [args.preset])
    t0 = time.perf_counter()
    try:
        results = [bench_preset(n, args, work) for n in names]
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    text = json.dumps({"results": results, "torch": torch.__version__, "argv": sys.argv[1:] if argv is None else argv,
                       "wall_s": round(time.perf_counter() - t0, 1)}, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
