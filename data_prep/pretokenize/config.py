"""Pre-tokenization's knobs: one recipe is one ``PretokenizeConfig``.

``__post_init__`` checks what the recipe alone decides. What needs the tokenizer (the clip length
against its temporal factor, the scale schedule's validity, its last scale against the tokenizer's
latent grid) is checked when the encoder is built (:mod:`data_prep.pretokenize.encoder`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from data_prep import shards
from data_prep.text_encoder import TextEncoderConfig
from data_prep.video import ClipSamplingConfig

SPATIAL_FACTOR = 16  # the tokenizer's spatial compression (checked again against the tokenizer)
MEMORY_FORMATS = {"auto": torch.contiguous_format,  # NCDHW: measured faster on an H100 (see the knob)
                  "channels_last": torch.channels_last_3d, "contiguous": torch.contiguous_format}


NVDEC_WITH_CPU_DECODERS = (
    "pyav_decoders > 0 with NVDEC decode (decode_device=gpu): NVDEC's colour conversion (DALI's CUDA "
    "kernel) and the CPU decoders' (libswscale) give different pixels, so the shards would depend on "
    "which decoder took a clip. Set pyav_decoders: 0, or decode on the CPU (decode_device: cpu); "
    "docs/pretokenize.md, 'Choosing decoders'")


NVDEC_MICRO_BATCH = 4
"""encoder_micro_batch=0 (auto) with NVDEC decode: the launch size measured best on an H100
(docs/BENCHMARKS.md, session 7)."""


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
    """Where frames are decoded: auto (gpu when the encoder is on cuda and no PyAV decoders are asked
    for, else cpu), cpu or gpu (NVDEC, frames stay on the GPU). Decides the pixels (NVDEC's colour
    conversion differs from the CPU decoders') and, with the decoders, which codecs are accepted
    (docs/pretokenize.md, "Choosing decoders")."""
    decoder: str = "dali"
    """dali: decode_pipelines DALI pipelines (plus pyav_decoders PyAV decoders on cpu); pyav: PyAV
    decoders only (pyav_decoders of them, or decode_threads if that is 0; the benchmark's baseline)."""
    decode_threads: int = 2
    """Host threads of each DALI decode pipeline (libavcodec on cpu; demuxing and NVDEC feeding on gpu)."""
    decode_pipelines: int = 0
    """DALI pipelines per worker, each a decoder pulling clips from one queue with up to
    ceil(batch_size / decode_pipelines) videos per run: NVDEC with decode_device=gpu (each its own CUDA
    stream and NVDEC sessions, so several NVDEC engines work at once), DALI's CPU decoder (VP8, VP9,
    MJPEG) on cpu, costing up to decode_threads host cores each. 0 = auto: 8 on gpu (the best measured on
    an H100, docs/BENCHMARKS.md), 1 on cpu. Capped at batch_size. The shards do not depend on it."""
    pyav_decoders: int = 0
    """PyAV decoders beside the DALI pipelines (decode_device cpu only): each a thread pulling one video
    at a time from the same queue, about one host core busy while it decodes. They decode every codec
    libavcodec knows (so H.264, HEVC, MPEG-4 and AV1 are accepted on cpu when this is > 0, and go to
    them only) with DALI's colour conversion and resize, so which decoder took a clip does not change a
    byte of the shards (tested). Not with NVDEC: its pixels differ from every CPU decoder's."""
    probe_workers: int = 4
    """Threads probing containers (PyAV demux) ahead of decoding."""
    prefetch_batches: int = 2
    """Batches in flight through the decoders ahead of the encoder (and as many decoded ones buffered):
    the pipeline's prefetch depth. DALI's own prefetch queue stays 1, since each DALI run is fed exactly
    one batch's clips and its output taken at once; depth comes from this many batches submitted to the
    decoder lanes at a time (docs/pretokenize.md, "Choosing decoders"). More costs one batch of decoded
    frames each (GPU memory with NVDEC); the shards do not depend on it."""
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
    (NCDHW), or auto (contiguous: channels_last measured slower on an H100, GroupNorm converting back
    each time; figures in docs/BENCHMARKS.md). The latents agree to float rounding, but the layouts run
    different kernels, so byte-identical reruns need the same value."""
    encoder_micro_batch: int = 0
    """Clips per encoder launch within a batch; 0 = auto: 4 (NVDEC_MICRO_BATCH) when frames are
    decoded on NVDEC (decode_device gpu), else the whole batch. A smaller value encodes the batch in
    launches of this many clips (CUDA graph captured for that size, the last launch zero-padded) with
    the host waiting for each before the next, leaving gaps in which NVDEC decode's kernels run on the
    shared GPU. On an H100 (docs/BENCHMARKS.md, session 7) 4-clip launches raised NVDEC decode beside
    the busy encoder from 6 to 25 clips/s and the pipeline by 5% (17x128) and 10% (UCF-101 sampling),
    for 5% of the encoder-alone rate, a cost not worth paying when nothing decodes on the GPU; hence
    auto. Like batch_size, it fixes which clips the encoder sees together: byte-identical reruns need
    the same value (decode_process does not change it)."""
    encoder_compile: bool = False
    """torch.compile the tokenizer's encoder (Inductor) before the CUDA graph is captured; the first
    batch waits for the compile. Other kernels (Inductor keeps fused intermediates in fp32 where the
    eager bf16 encoder rounds), so byte-identical reruns need the same value; its latents must be no
    farther from an fp32 encode than the eager encoder's (GPU test). 1.5x the eager encoder alone at
    17x128 on an H100 (session 7); bench_pretokenize.py --encoder-compile measures it."""
    decode_process: bool = False
    """Run the decoders (decode_pipelines DALI pipelines, pyav_decoders PyAV decoders) in a process of
    their own per worker (spawned when the first partition starts, closed with the run). NVDEC decode
    then has its own CUDA context: the route against decode's kernels waiting behind the encoder's in
    one context (session 7: 96 clips/s decode alone, 6 beside a busy encoder), measured by
    bench_pretokenize.py --beside-decode process and --decode-process. Frames come back over CUDA IPC
    (NVDEC) or shared memory (host decoders); the shards are the same bytes as in-process decoding
    (tested). A crash of that process fails the partition with its error, nothing committed. Costs a
    second Python process (seconds to start) and, on NVDEC, a second CUDA context on the GPU."""
    decode_stream_priority: int = 0
    """CUDA stream priority of NVDEC decode (DALI's streams and the copy of its output), <= 0: lower runs
    first; CUDA clamps it to the device's range (-5..0 on Hopper). Meant to let DALI's small per-frame
    kernels run ahead of the encoder's queued ones on a shared GPU; on an H100 -5 changed nothing
    (session 7: decode beside the busy encoder 6.26 vs 6.25 clips/s, the pipeline within 1%). The
    frames, and so the shards, do not depend on it."""
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
        if self.pyav_decoders < 0:
            raise ValueError(f"pyav_decoders must be >= 0, got {self.pyav_decoders}")
        if self.pyav_decoders and self.decode_device == "gpu":
            raise ValueError(NVDEC_WITH_CPU_DECODERS)
        if self.encoder_micro_batch < 0:
            raise ValueError(f"encoder_micro_batch must be >= 0 (0 = auto: {NVDEC_MICRO_BATCH} with NVDEC decode, "
                             f"else the whole batch), got {self.encoder_micro_batch}")
        if self.decode_stream_priority > 0:
            raise ValueError("decode_stream_priority must be <= 0 (0 = CUDA's default; lower runs first), "
                             f"got {self.decode_stream_priority}")
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
            if any(len(s) != 2 for s in self.scale_schedule):
                raise ValueError(f"scale_schedule must be a list of [h, w] pairs, got {self.scale_schedule}")
            grid = [self.clips.height // SPATIAL_FACTOR, self.clips.width // SPATIAL_FACTOR]
            if [int(v) for v in self.scale_schedule[-1]] != grid:
                raise ValueError(f"scale_schedule must end at the latent grid {grid} of "
                                 f"clips.height x clips.width = {self.clips.height}x{self.clips.width}, "
                                 f"got {list(self.scale_schedule[-1])}")


def host_decoders(cfg: PretokenizeConfig) -> bool:
    """Whether ``cfg`` asks for PyAV decoders (``decoder: pyav`` or ``pyav_decoders`` > 0): they decode
    on the host, and NVDEC's pixels differ from theirs."""
    return cfg.decoder == "pyav" or cfg.pyav_decoders > 0


def resolve_decode_device(cfg: PretokenizeConfig, encoder_device: torch.device) -> str:
    """``decode_device`` auto: NVDEC when the encoder is on cuda, unless PyAV decoders are asked for
    (CPU decoders and NVDEC give different pixels, so a run uses one or the other)."""
    if cfg.decode_device != "auto":
        return cfg.decode_device
    return "gpu" if encoder_device.type == "cuda" and not host_decoders(cfg) else "cpu"


def encoder_micro_batch(cfg: PretokenizeConfig, encoder_device: torch.device) -> int:
    """Clips per encoder launch: ``cfg.encoder_micro_batch``, or for 0 (auto) ``NVDEC_MICRO_BATCH``
    with NVDEC decode and the whole batch otherwise; at most ``batch_size``. Not decode_process: it
    changes no byte of the shards."""
    nvdec = resolve_decode_device(cfg, encoder_device) == "gpu"
    wanted = cfg.encoder_micro_batch or (NVDEC_MICRO_BATCH if nvdec else cfg.batch_size)
    return min(wanted, cfg.batch_size)
