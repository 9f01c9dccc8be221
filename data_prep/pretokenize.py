"""Pre-tokenization: videos → DALI clips → tokenizer latents and multi-scale bits → MDS shards.

Design decisions:
- **Partitions, not ranks, are the unit of work and of restart.** The input manifest is cut into
  ``num_partitions`` contiguous slices (default: one per worker); worker ``i`` of ``n`` (torchrun rank,
  SLURM array task, or both combined) owns partitions ``p`` with ``p % n == i``. Each partition is
  written into ``.tmp-part-…``, committed (marker written last) and renamed to ``part-…``. A rerun
  skips committed partitions and redoes the others from scratch, so its output is byte-identical to
  an uninterrupted run. More partitions than workers make restarts cheaper and let a rerun use a
  different number of workers.
- **No collectives.** Workers never talk to each other: the run manifest is created with an atomic
  hard link (one creator, every other worker compares), and whichever worker finds every partition
  committed merges the indexes (merging is deterministic and atomic, so a race writes the same
  bytes). The same code runs under torchrun, a SLURM array, or a single process.
- **Everything in input order.** Probing runs in a thread pool and decoding in a background thread,
  but results are consumed in manifest order and encoded in fixed batches, so the shards do not
  depend on timing. Rejects are sorted by (manifest row, clip start).
- **Honest rejects.** A video that is missing, unreadable, too short or in a codec the decode device
  cannot handle goes to ``rejects.jsonl`` with the reason (probe stage, whole video); a clip that
  fails to decode or decodes to fewer frames goes there with its clip start. Nothing is substituted.
"""
from __future__ import annotations

import hashlib
import os
import queue
import shutil
import socket
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from data_prep import shards
from data_prep.manifest import VideoRecord, read_manifest
from data_prep.text_encoder import FrozenTextEncoder, TextEncoderConfig
from data_prep.video import (ClipPlan, ClipSamplingConfig, DaliClipDecoder, PyAVClipDecoder,
                             VideoUnusable, frames_to_model_input, plan_clips, probe_video)
from tokenizer.quantizer import check_schedule
from videoar_common.atomic import _fsync_dir, is_committed, mark_committed
from videoar_common.distributed import pick_device

SPATIAL_FACTOR = 16  # the tokenizer's spatial compression (checked again against the tokenizer)
MEMORY_FORMATS = {"auto": torch.contiguous_format,  # NCDHW: measured faster on an H100 (see the knob)
                  "channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


@dataclass(kw_only=True)
class PretokenizeConfig:
    """One pre-tokenization run: inputs, clip sampling, quantization, output, parallelism."""

    tokenizer: str = ""
    """Tokenizer checkpoint directory (written by tokenizer training / save_tokenizer)."""
    input_manifest: str = ""
    """Input manifest, CSV or JSONL (path, caption and/or label, optional start/end/fps)."""
    output_dir: str = ""
    """Output shard directory (manifest.json, part-*/ partitions, merged index.json, rejects.jsonl)."""
    clips: ClipSamplingConfig = field(default_factory=ClipSamplingConfig)
    """Clip sampling and resolution (shared with tokenizer training)."""
    scale_schedule: list[list[int]] = field(default_factory=list)
    """Multi-scale schedule [[h, w], ...] for the bits; empty = the tokenizer's own. The last scale must
    be the latent grid (clips.height / 16, clips.width / 16)."""
    latent_dtype: str = "float16"
    """Storage dtype of the continuous latent: float32, float16 or bfloat16 (bits are computed from the
    latent as stored, so requantizing what the reader returns reproduces the bits exactly)."""
    batch_size: int = 8
    """Clips per decode / encode batch."""
    device: str = "auto"
    """Encoder device: auto (the local GPU if CUDA is present), cpu or cuda. bf16 autocast on cuda."""
    decode_device: str = "auto"
    """DALI decode device: auto (gpu when the encoder is on cuda), cpu or gpu (NVDEC, frames stay on
    the GPU). Decides which codecs are accepted (see docs/shard_format.md)."""
    decoder: str = "dali"
    """dali (production) or pyav (CPU baseline for the benchmark; decodes any libavcodec codec)."""
    decode_threads: int = 2
    """DALI CPU threads per decode pipeline (or PyAV threads)."""
    decode_pipelines: int = 0
    """DALI pipelines per worker; each batch is split over them and they decode concurrently (on the GPU
    each has its own CUDA stream and NVDEC sessions, so several NVDEC engines work at once). 0 = auto:
    8 with decode_device=gpu (best measured on an H100), 1 on cpu (DALI's CPU decoder already spreads
    a batch over decode_threads).
    Capped at batch_size. The frames, and so the shards, do not depend on it."""
    probe_workers: int = 4
    """Threads probing containers (PyAV demux) ahead of decoding."""
    prefetch_batches: int = 2
    """Decoded batches buffered ahead of the encoder."""
    num_partitions: int = 0
    """Partitions of the input manifest; 0 = one per worker. Use several per worker for cheap restarts."""
    compression: str = ""
    """MDS shard compression: empty (none) or e.g. zstd."""
    shard_size_limit: int = 1 << 28
    """Maximum bytes per MDS shard file."""
    deterministic: bool = True
    """Deterministic cuDNN kernels (needed for byte-identical reruns on GPU)."""
    encoder_memory_format: str = "auto"
    """Layout of the tokenizer encoder's weights and activations: channels_last (NDHWC), contiguous
    (NCDHW), or auto (contiguous: on an H100 channels_last encoded 5% (17x128²) and 12% (33x384x672)
    slower, GroupNorm converting back each time; docs/BENCHMARKS.md). The latents agree to float
    rounding, but the layouts run different kernels, so byte-identical reruns need the same value."""
    encoder_cuda_graph: bool = True
    """On cuda, encode each batch by replaying one CUDA graph of the encoder, captured once at start for
    batch_size clips (it holds one batch's activations; smaller batches are zero-padded): one launch
    instead of hundreds of kernels, so the encoder's thread leaves the CPU to the decode threads.
    Latents equal the eager encoder's on the same (padded) batch, bit for bit (GPU test)."""
    max_decode_error_rate: float = 0.5
    """Abort a partition (nothing committed; the error quotes the first decode error) when more than this
    fraction of its clips fail to decode after at least 32 tries: that is a broken decoder setup (driver,
    NVDEC, DALI build), not a broken corpus, and must not turn into a corpus of rejects. 1.0 = never."""
    text_encoder: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    """Optional frozen text encoder; its caption features are stored per sample."""
    progress_bar: bool = True
    """Show a tqdm bar per worker (videos, clips/s, rejects)."""

    def __post_init__(self) -> None:
        for knob in ("tokenizer", "input_manifest", "output_dir"):
            if not getattr(self, knob):
                raise ValueError(f"{knob} must be set (a path)")
        if self.latent_dtype not in shards.LATENT_DTYPES:
            raise ValueError(f"latent_dtype must be one of {list(shards.LATENT_DTYPES)}, got {self.latent_dtype!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.decode_device not in ("auto", "cpu", "gpu"):
            raise ValueError(f"decode_device must be auto, cpu or gpu, got {self.decode_device!r}")
        if self.decoder not in ("dali", "pyav"):
            raise ValueError(f"decoder must be dali or pyav, got {self.decoder!r}")
        if self.decoder == "pyav" and self.decode_device == "gpu":
            raise ValueError("decoder=pyav decodes on the CPU: set decode_device to cpu or auto")
        if self.encoder_memory_format not in MEMORY_FORMATS:
            raise ValueError(f"encoder_memory_format must be one of {list(MEMORY_FORMATS)}, "
                             f"got {self.encoder_memory_format!r}")
        if self.decode_pipelines < 0:
            raise ValueError(f"decode_pipelines must be >= 0 (0 = auto), got {self.decode_pipelines}")
        for knob in ("batch_size", "decode_threads", "probe_workers", "prefetch_batches", "shard_size_limit"):
            if getattr(self, knob) < 1:
                raise ValueError(f"{knob} must be >= 1, got {getattr(self, knob)}")
        if not 0.0 < self.max_decode_error_rate <= 1.0:
            raise ValueError(f"max_decode_error_rate must be in (0, 1], got {self.max_decode_error_rate}")
        if self.num_partitions < 0:
            raise ValueError(f"num_partitions must be >= 0 (0 = one per worker), got {self.num_partitions}")
        if self.compression not in ("", "zstd", "gz", "bz2", "br", "snappy", "zstd:3", "zstd:9"):
            raise ValueError(f"compression must be empty or an MDS codec such as zstd, got {self.compression!r}")
        if self.scale_schedule:
            try:
                sched = check_schedule(self.scale_schedule)
            except ValueError as e:
                raise ValueError(f"scale_schedule: {e}") from None
            grid = (self.clips.height // SPATIAL_FACTOR, self.clips.width // SPATIAL_FACTOR)
            if sched[-1] != grid:
                raise ValueError(f"scale_schedule must end at the latent grid {list(grid)} of "
                                 f"clips.height x clips.width = {self.clips.height}x{self.clips.width}, "
                                 f"got {list(sched[-1])}")


# ----------------------------------------------------------------------------------------------
# Who am I: partitions of this worker
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Worker:
    """This process's slot among all pre-tokenization workers (passed explicitly, never global)."""

    index: int
    count: int
    local_rank: int = 0
    launcher: str = "single"

    def partitions(self, num_partitions: int) -> list[int]:
        return [p for p in range(num_partitions) if p % self.count == self.index]


def _env_int(env: dict, *names: str, default: int) -> int:
    for name in names:
        if env.get(name) not in (None, ""):
            return int(env[name])
    return default


def worker_from_env(env: dict | None = None) -> Worker:
    """Worker slot from a SLURM array (``SLURM_ARRAY_TASK_ID/COUNT/MIN``) and/or torchrun / srun ranks.

    Ranks are read like ``common.distributed.read_launch_env`` (torchrun first, then srun). Both
    combine: array task ``a`` of ``A`` running ``W`` ranks gives worker ``a * W + rank`` of ``A * W``.
    """
    env = dict(os.environ if env is None else env)
    rank = _env_int(env, "RANK", "SLURM_PROCID", default=0)
    world = _env_int(env, "WORLD_SIZE", "SLURM_NTASKS", default=1)
    local_rank = _env_int(env, "LOCAL_RANK", "SLURM_LOCALID", default=0)
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside the world of {world} (RANK/WORLD_SIZE or SLURM_PROCID/SLURM_NTASKS)")
    launcher = "torchrun" if "RANK" in env else ("srun" if world > 1 else "single")
    if env.get("SLURM_ARRAY_TASK_ID") not in (None, ""):
        task = int(env["SLURM_ARRAY_TASK_ID"]) - _env_int(env, "SLURM_ARRAY_TASK_MIN", default=0)
        tasks = _env_int(env, "SLURM_ARRAY_TASK_COUNT", default=0)
        if not 0 <= task < tasks:
            raise ValueError(f"SLURM_ARRAY_TASK_ID={env['SLURM_ARRAY_TASK_ID']} is outside the array "
                             f"(SLURM_ARRAY_TASK_MIN={env.get('SLURM_ARRAY_TASK_MIN')}, "
                             f"SLURM_ARRAY_TASK_COUNT={tasks}); submit with --array=0-N (no step)")
        return Worker(index=task * world + rank, count=tasks * world, local_rank=local_rank,
                      launcher="slurm-array" if world == 1 else f"slurm-array+{launcher}")
    return Worker(index=rank, count=world, local_rank=local_rank, launcher=launcher)


# ----------------------------------------------------------------------------------------------
# The encoder side: tokenizer, quantizer, optional text encoder
# ----------------------------------------------------------------------------------------------

@dataclass
class EncodedBatch:
    latents: list[np.ndarray]
    """Per clip: stored latent ``(T, d, H, W)`` in the storage dtype."""
    bits: list[np.ndarray]
    """Per clip: packed bits uint8 ``(T, L, ceil(d/8))``."""
    text: list[tuple[np.ndarray, np.ndarray]] | None


class ClipEncoder:
    """Tokenizer encoder + multi-scale BSQ bits (+ text features) for batches of decoded clips."""

    def __init__(self, cfg: PretokenizeConfig, device: torch.device):
        from tokenizer import load_tokenizer
        self.cfg, self.device = cfg, device
        self.tokenizer = load_tokenizer(cfg.tokenizer, device=device)
        tcfg = self.tokenizer.cfg
        try:
            self.latent_frames = tcfg.latent_frames(cfg.clips.num_frames)
        except ValueError as e:
            raise ValueError(f"clips.num_frames: {e} (tokenizer {cfg.tokenizer})") from None
        f = tcfg.spatial_factor
        self.latent_hw = (cfg.clips.height // f, cfg.clips.width // f)
        schedule = cfg.scale_schedule or tcfg.scale_schedule
        if tuple(schedule[-1]) != self.latent_hw:
            knob = "scale_schedule" if cfg.scale_schedule else "scale_schedule (empty: the tokenizer's)"
            raise ValueError(f"{knob} ends at {list(schedule[-1])} but clips of "
                             f"{cfg.clips.height}x{cfg.clips.width} have a latent grid {list(self.latent_hw)} "
                             f"(spatial factor {f}); set scale_schedule for this resolution")
        self.quantizer = self.tokenizer.quantizer_for(schedule).to(device)
        self.schedule = [list(s) for s in self.quantizer.scales]
        self.latent_dim = tcfg.latent_dim
        self.encode_dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.memory_format = MEMORY_FORMATS[cfg.encoder_memory_format]
        if self.memory_format == torch.channels_last_3d:
            # Only the encoder runs here. Its convs then get NDHWC inputs: CausalConv3d writes its
            # time-padded input in the weight's layout (see tokenizer.model.CausalConv3d._cat_time).
            self.tokenizer.encoder.to(memory_format=torch.channels_last_3d)
        self.text = FrozenTextEncoder(cfg.text_encoder, device) if cfg.text_encoder.path else None
        self.graph = None
        if cfg.encoder_cuda_graph and device.type == "cuda":
            c = cfg.clips
            self.graph = EncoderGraph(self._latent, (cfg.batch_size, c.num_frames, c.height, c.width, 3), device)

    @torch.no_grad()
    def _latent(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """uint8 frames → continuous latent ``(B, d, T, h, w)`` (bf16 autocast on cuda)."""
        video_BCTHW = frames_to_model_input(frames_BFHWC)
        # cache_enabled=False: the weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda", cache_enabled=False):
            return self.tokenizer.encode(video_BCTHW)

    @torch.no_grad()
    def encode(self, frames: Sequence[torch.Tensor], captions: Sequence[str]) -> EncodedBatch:
        """uint8 frames ``(F, H, W, 3)`` per clip (CPU or CUDA) → stored latents and packed bits."""
        frames_BFHWC = torch.stack([f.to(self.device, non_blocking=True) for f in frames])
        if self.graph is not None and self.graph.fits(frames_BFHWC):
            latent_BdTHW = self.graph(frames_BFHWC)
        else:
            latent_BdTHW = self._latent(frames_BFHWC)
        latent_BTdHW = shards.round_latent(latent_BdTHW.permute(0, 2, 1, 3, 4), self.cfg.latent_dtype)
        if not torch.isfinite(latent_BTdHW).all():  # never write NaN/inf (nor bits derived from them)
            bad = (~torch.isfinite(latent_BTdHW)).flatten(1).any(1).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite latent for clips {bad} of a batch ({', '.join(captions[i] for i in bad[:3])}) after "
                f"rounding to latent_dtype={self.cfg.latent_dtype} (float16 overflows past 65504: use bfloat16); "
                f"the tokenizer output was finite: {bool(torch.isfinite(latent_BdTHW).all())}")
        b, t, d, h, w = latent_BTdHW.shape
        bits = self.quantizer.latent_to_bits(latent_BTdHW.reshape(b * t, d, h, w))
        bits_BTLd = self.quantizer.flatten_bits(bits).reshape(b, t, -1, d).cpu().numpy()
        latents = shards.latent_to_storage(latent_BTdHW.cpu(), self.cfg.latent_dtype)
        text = None
        if self.text is not None:
            feats, mask = self.text.encode(captions)
            text = list(zip(feats, mask))
        return EncodedBatch(latents=list(latents), bits=[shards.pack_bits(x) for x in bits_BTLd], text=text)

    def shapes(self) -> dict:
        return shards.manifest_shapes(latent_frames=self.latent_frames, latent_dim=self.latent_dim,
                                      latent_hw=self.latent_hw, tokens_per_frame=self.quantizer.tokens_per_frame,
                                      text_shape=self.text.feature_shape if self.text else None)


class EncoderGraph:
    """``fn`` on batches of up to ``shape[0]`` samples, captured once as a CUDA graph and replayed.

    A batch is one launch instead of the encoder's ~650 kernels (17x128²), so the encoder's thread
    stops competing with the decode threads for the CPU. A smaller batch (a partition's last, or one
    with rejects) is zero-padded to the captured size: no second set of activations next to the
    graph's (at 33x384x672 one batch's activations are most of an 80 GB GPU), and a clip's latents do
    not depend on how full its batch was. The capture runs before any decode thread exists. On an
    H200 the pipeline's gain was within run-to-run spread (docs/BENCHMARKS.md).
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], device: torch.device):
        self.input = torch.zeros(shape, dtype=torch.uint8, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up outside the capture: cuDNN/cuBLAS handles, workspaces
            for _ in range(2):
                fn(self.input)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = fn(self.input)

    def fits(self, x: torch.Tensor) -> bool:
        return x.shape[1:] == self.input.shape[1:] and x.shape[0] <= self.input.shape[0] \
            and x.device == self.input.device

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        self.input[:b].copy_(x)
        self.input[b:].zero_()
        self.graph.replay()
        return self.output[:b].clone()  # the next replay overwrites self.output


# ----------------------------------------------------------------------------------------------
# Run manifest
# ----------------------------------------------------------------------------------------------

def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("videoar-megatron")
    except PackageNotFoundError:
        return "source"


def build_run_manifest(cfg: PretokenizeConfig, enc: ClipEncoder, *, num_partitions: int,
                       decode_device: str) -> dict:
    """``manifest.json``: everything that fixes the bytes of the shards, and nothing run-specific."""
    text = None
    if enc.text is not None:
        text = {"hash": enc.text.content_hash, "max_length": cfg.text_encoder.max_length,
                "feature_dim": enc.text.feature_dim}
    c = cfg.clips
    return {
        "format_version": shards.FORMAT_VERSION, "code_version": code_version(),
        "tokenizer_hash": enc.tokenizer.content_hash, "scale_schedule": enc.schedule,
        "latent_dim": enc.latent_dim, "tokens_per_frame": enc.quantizer.tokens_per_frame,
        "resolution": [c.height, c.width], "num_frames": c.num_frames, "frame_stride": c.frame_stride,
        "target_fps": c.target_fps, "fps": c.target_fps or None, "clips_per_video": c.clips_per_video,
        "latent_frames": enc.latent_frames, "latent_hw": list(enc.latent_hw),
        "latent_dtype": cfg.latent_dtype, "shapes": enc.shapes(),
        "dtypes": shards.manifest_dtypes(cfg.latent_dtype, enc.text is not None),
        "columns": shards.mds_columns(enc.text is not None), "compression": cfg.compression or None,
        "shard_size_limit": cfg.shard_size_limit, "text_encoder": text,
        "input_manifest_sha256": file_sha256(cfg.input_manifest), "num_partitions": num_partitions,
        "decode_device": decode_device, "decoder": cfg.decoder, "encode_dtype": enc.encode_dtype,
    }


# ----------------------------------------------------------------------------------------------
# The clip stream: probe (thread pool) → plan → decode (background thread), in manifest order
# ----------------------------------------------------------------------------------------------

class DecoderBroken(RuntimeError):
    """Too many clips of a partition failed to decode: the decoder setup, not the data, is at fault."""


MIN_DECODE_TRIES = 32


@dataclass(frozen=True)
class ClipJob:
    row: int
    """Row of the input manifest (0-based)."""
    record: VideoRecord
    source: str
    plan: ClipPlan


@dataclass(frozen=True)
class Reject:
    row: int
    source: str
    clip_start: int | None
    kind: str
    reason: str

    def to_json(self) -> dict:
        return {"row": self.row, "source": self.source, "clip_start": self.clip_start,
                "kind": self.kind, "reason": self.reason}


def source_name(record_path: str, manifest_root: Path) -> str:
    """Path as recorded in samples: relative to the manifest's directory when under it."""
    try:
        return str(Path(record_path).relative_to(manifest_root))
    except ValueError:
        return record_path


def _ordered_map(fn: Callable, items: Sequence, workers: int) -> Iterator:
    """``map`` in a thread pool with a bounded window of pending work, results in input order."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        it = iter(items)
        for item in it:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _background(gen: Iterator, depth: int, setup: Callable[[], None] | None = None) -> Iterator:
    """Run a generator in a daemon thread, ``depth`` items ahead; exceptions re-raise here."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()
    stop = threading.Event()

    def produce():
        try:
            if setup is not None:
                setup()
            for item in gen:
                while not stop.is_set():
                    try:
                        q.put(("item", item), timeout=0.5)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put(("end", done))
        except BaseException as e:  # noqa: BLE001 - handed to the consumer
            q.put(("error", e))

    thread = threading.Thread(target=produce, daemon=True, name="pretok-decode")
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise value
            yield value
    finally:
        stop.set()


GPU_DECODE_PIPELINES = 8
"""decode_pipelines=0 (auto) with NVDEC decode. Measured on an H100 (benchmarks/bench_pretokenize.py,
17x128² clips from 320x240 h264, decode only): 1, 2, 4, 8 pipelines gave 85.5, 97.8, 100.0, 106.2
clips/s; at 33x384x672 the count made no difference (35 clips/s, five times the encoder's rate)."""


def decode_pipelines(cfg: PretokenizeConfig, decode_device: str) -> int:
    """The DALI pipeline count for ``cfg.decode_pipelines`` (0 = auto) on ``decode_device``."""
    wanted = cfg.decode_pipelines or (GPU_DECODE_PIPELINES if decode_device == "gpu" else 1)
    return min(wanted, cfg.batch_size)


class ClipStream:
    """Yields, in manifest order, batches ``(jobs, results, decode_seconds)`` and rejects."""

    def __init__(self, cfg: PretokenizeConfig, decode_device: str, device_id: int, manifest_root: Path):
        self.cfg, self.decode_device, self.device_id = cfg, decode_device, device_id
        self.root = manifest_root
        self._cached_decoder = None

    def _probe(self, item: tuple[int, VideoRecord]) -> list[ClipJob] | Reject:
        row, rec = item
        source = source_name(rec.path, self.root)
        try:
            info = probe_video(rec.path, device=self.decode_device if self.cfg.decoder == "dali" else "gpu")
            plans = plan_clips(info, self.cfg.clips, start_s=rec.start, end_s=rec.end, fps_override=rec.fps)
        except VideoUnusable as e:
            return Reject(row, source, None, e.kind, e.reason)
        return [ClipJob(row, rec, source, p) for p in plans]

    def _batches(self, rows: Sequence[tuple[int, VideoRecord]], rejects: list[Reject]) -> Iterator[list[ClipJob]]:
        batch: list[ClipJob] = []
        for result in _ordered_map(self._probe, rows, self.cfg.probe_workers):
            if isinstance(result, Reject):
                rejects.append(result)
                continue
            for job in result:
                batch.append(job)
                if len(batch) == self.cfg.batch_size:
                    yield batch
                    batch = []
        if batch:
            yield batch

    def _decoder(self):
        c = self.cfg
        if c.decoder == "pyav":
            return PyAVClipDecoder(height=c.clips.height, width=c.clips.width, num_threads=c.decode_threads)
        return DaliClipDecoder(height=c.clips.height, width=c.clips.width, device=self.decode_device,
                               device_id=self.device_id, batch_size=c.batch_size, num_threads=c.decode_threads,
                               pipelines=decode_pipelines(c, self.decode_device))

    def _decoded(self, rows, rejects) -> Iterator[tuple[list[ClipJob], list, float]]:
        # One decoder (its DALI pipelines) per process, built on first use and reused by later partitions.
        if self._cached_decoder is None:
            self._cached_decoder = self._decoder()
        decoder = self._cached_decoder
        # GPU: DALI's output is copied into torch tensors on a stream of this thread, which is
        # synchronised before the batch is handed over, so the encoder's stream never waits on it.
        stream = torch.cuda.Stream(self.device_id) if decoder.device == "gpu" else None
        for jobs in self._batches(rows, rejects):
            t0 = time.perf_counter()
            if stream is None:
                results = decoder.decode([j.plan for j in jobs])
            else:
                with torch.cuda.stream(stream):
                    results = decoder.decode([j.plan for j in jobs])
                stream.synchronize()
            yield jobs, results, time.perf_counter() - t0

    def __call__(self, rows: Sequence[tuple[int, VideoRecord]], rejects: list[Reject]) -> Iterator:
        def on_gpu() -> None:  # the decode thread's CUDA device (DALI output copies, its stream)
            torch.cuda.set_device(self.device_id)
        setup = on_gpu if self.decode_device == "gpu" else None
        return _background(self._decoded(rows, rejects), self.cfg.prefetch_batches, setup)


# ----------------------------------------------------------------------------------------------
# One partition
# ----------------------------------------------------------------------------------------------

@dataclass
class PartitionStats:
    partition: str
    videos: int = 0
    videos_done: int = 0
    """Videos of the partition handled so far (for progress bars)."""
    clips: int = 0
    rejects: int = 0
    decode_s: float = 0.0
    """Decode thread busy time (overlaps with encoding)."""
    wait_s: float = 0.0
    """Time the encoder waited for decoded clips (decode-bound time)."""
    encode_s: float = 0.0
    write_s: float = 0.0
    total_s: float = 0.0
    skipped: bool = False

    @property
    def clips_per_s(self) -> float:
        return self.clips / self.total_s if self.total_s > 0 else 0.0


def _mds_writer():
    """The MDS writer class (a seam for tests that simulate a crash mid-partition)."""
    from streaming import MDSWriter
    return MDSWriter


def _sample(job: ClipJob, enc: EncodedBatch, i: int) -> dict[str, Any]:
    rec = job.record
    s = {"latent": enc.latents[i], "bits": enc.bits[i], "label": int(rec.label), "caption": rec.caption,
         "sample_id": shards.sample_id(job.source, job.plan.start_frame), "source": job.source,
         "clip_start": int(job.plan.start_frame), "clip_stride": int(job.plan.stride)}
    if enc.text is not None:
        s["text_features"], s["text_mask"] = enc.text[i]
    return s


class Pretokenizer:
    """Runs the partitions of one worker. Build once per process (it loads the tokenizer)."""

    def __init__(self, cfg: PretokenizeConfig, worker: Worker):
        self.cfg, self.worker = cfg, worker
        self.out = Path(cfg.output_dir)
        self.records = read_manifest(cfg.input_manifest)
        self.manifest_root = Path(cfg.input_manifest).parent.resolve()
        self.device = pick_device(cfg.device, worker.local_rank)
        if cfg.deterministic and self.device.type == "cuda":
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        dd = cfg.decode_device
        self.decode_device = ("gpu" if self.device.type == "cuda" else "cpu") if dd == "auto" else dd
        if cfg.decoder == "pyav":
            self.decode_device = "cpu"
        if self.decode_device == "gpu" and not torch.cuda.is_available():
            raise ValueError("decode_device=gpu needs CUDA (NVDEC), which this host does not have; "
                             "use decode_device=cpu (and `videoar transcode` for codecs DALI CPU cannot decode)")
        self.num_partitions = cfg.num_partitions or worker.count
        self.encoder = ClipEncoder(cfg, self.device)
        self.manifest = build_run_manifest(cfg, self.encoder, num_partitions=self.num_partitions,
                                           decode_device=self.decode_device)
        if self.device.type == "cuda":
            device_id = self.device.index or 0
        else:  # encoder on CPU, NVDEC decode: still one GPU per local rank
            device_id = worker.local_rank % max(torch.cuda.device_count(), 1)
        self.stream = ClipStream(cfg, self.decode_device, device_id, self.manifest_root)

    def run(self, progress: Callable[[PartitionStats], None] | None = None) -> list[PartitionStats]:
        """Write this worker's unfinished partitions, then merge if every partition is committed."""
        shards.ensure_run_manifest(self.out, self.manifest)
        stats = []
        for p in self.worker.partitions(self.num_partitions):
            stats.append(self.run_partition(p, progress))
        self.maybe_merge()
        return stats

    def pending(self) -> dict[int, int]:
        """Partition → number of videos, for this worker's partitions not committed yet."""
        return {p: len(shards.partition_range(p, self.num_partitions, len(self.records)))
                for p in self.worker.partitions(self.num_partitions)
                if not is_committed(self.out / shards.partition_name(p, self.num_partitions))}

    def maybe_merge(self) -> dict | None:
        if len(shards.committed_partitions(self.out, self.num_partitions)) == self.num_partitions:
            return shards.merge_partitions(self.out, self.num_partitions)
        return None

    def run_partition(self, p: int, progress: Callable[[PartitionStats], None] | None = None) -> PartitionStats:
        name = shards.partition_name(p, self.num_partitions)
        final, tmp = self.out / name, self.out / f".tmp-{name}"
        stats = PartitionStats(partition=name)
        if is_committed(final):
            stats.skipped = True
            return stats
        if final.exists():
            raise RuntimeError(f"{final} exists without a COMMITTED marker (not written by this tool?); "
                               f"move it away and rerun")
        shutil.rmtree(tmp, ignore_errors=True)  # an interrupted attempt at this partition: redo it
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        rows = [(i, self.records[i]) for i in shards.partition_range(p, self.num_partitions, len(self.records))]
        rejects = self._write_partition(tmp, rows, stats, progress)
        rejects.sort(key=lambda r: (r.row, -1 if r.clip_start is None else r.clip_start))
        shards.write_jsonl(tmp / shards.REJECTS_FILE, [r.to_json() for r in rejects])
        stats.videos, stats.rejects = len(rows), len(rejects)
        stats.videos_done = len(rows)
        if progress is not None:
            progress(stats)
        mark_committed(tmp, {"samples": stats.clips, "rejects": stats.rejects, "videos": stats.videos})
        os.rename(tmp, final)
        _fsync_dir(self.out)
        stats.total_s = time.perf_counter() - t0
        self._log(stats)
        return stats

    def _write_partition(self, tmp: Path, rows, stats: PartitionStats, progress) -> list[Reject]:
        writer_cls = _mds_writer()
        rejects: list[Reject] = []
        columns = shards.mds_columns(self.encoder.text is not None)
        tries, fails, first_error = 0, 0, None
        with writer_cls(out=str(tmp), columns=columns, compression=self.cfg.compression or None,
                        size_limit=self.cfg.shard_size_limit) as writer:
            batches = self.stream(rows, rejects)
            while True:
                t_wait = time.perf_counter()
                try:
                    jobs, results, decode_s = next(batches)
                except StopIteration:
                    break
                stats.wait_s += time.perf_counter() - t_wait
                stats.decode_s += decode_s
                good = [(j, r) for j, r in zip(jobs, results) if isinstance(r, torch.Tensor)]
                failed = [Reject(j.row, j.source, j.plan.start_frame, r.kind, r.reason)
                          for j, r in zip(jobs, results) if not isinstance(r, torch.Tensor)]
                rejects += failed
                tries, fails = tries + len(jobs), fails + len(failed)
                first_error = first_error or (failed[0] if failed else None)
                self._check_decode_rate(tries, fails, first_error)
                if good:
                    self._encode_and_write(writer, good, stats)
                if progress is not None:
                    stats.rejects = len(rejects)
                    stats.videos_done = jobs[-1].row - rows[0][0] + 1
                    progress(stats)
        return rejects

    def _check_decode_rate(self, tries: int, fails: int, first: Reject | None) -> None:
        if tries >= MIN_DECODE_TRIES and fails > self.cfg.max_decode_error_rate * tries:
            raise DecoderBroken(
                f"{fails} of {tries} clips failed to decode with {self.cfg.decoder} on {self.decode_device} "
                f"(max_decode_error_rate={self.cfg.max_decode_error_rate}); first: {first.source} @ frame "
                f"{first.clip_start}: {first.reason}. Check the decoder setup on this host; nothing of this "
                f"partition was committed")

    def _encode_and_write(self, writer, good, stats: PartitionStats) -> None:
        t0 = time.perf_counter()
        frames = [r for _, r in good]
        if frames[0].is_cuda:  # made on the decode thread's stream: keep it alive for this one
            for f in frames:
                f.record_stream(torch.cuda.current_stream(f.device))
        enc = self.encoder.encode(frames, [j.record.caption for j, _ in good])
        t1 = time.perf_counter()
        for i, (job, _) in enumerate(good):
            writer.write(_sample(job, enc, i))
        stats.encode_s += t1 - t0
        stats.write_s += time.perf_counter() - t1
        stats.clips += len(good)

    def _log(self, stats: PartitionStats) -> None:
        log = {**stats.__dict__, "clips_per_s": stats.clips_per_s, "host": socket.gethostname(),
               "pid": os.getpid(), "worker": self.worker.index, "workers": self.worker.count,
               "launcher": self.worker.launcher, "device": str(self.device), "decode_device": self.decode_device,
               "decode_pipelines": decode_pipelines(self.cfg, self.decode_device) if self.cfg.decoder == "dali" else 0,
               "encoder_memory_format": str(self.encoder.memory_format).removeprefix("torch."),
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        shards.write_json(self.out / shards.LOG_DIR / f"{stats.partition}.json", log)


def merge_only(cfg_or_dir: PretokenizeConfig | str | Path) -> dict:
    """Merge step for a finished SLURM array (the dependent job): requires every partition committed."""
    out = Path(cfg_or_dir.output_dir if isinstance(cfg_or_dir, PretokenizeConfig) else cfg_or_dir)
    manifest = shards.read_shard_manifest(out)
    return shards.merge_partitions(out, int(manifest["num_partitions"]))

