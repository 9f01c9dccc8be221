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
    8 with decode_device=gpu (the best measured on an H100, docs/BENCHMARKS.md), 1 on cpu (DALI's CPU
    decoder already spreads a batch over decode_threads).
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
    (NCDHW), or auto (contiguous: channels_last measured slower on an H100, GroupNorm converting back
    each time; figures in docs/BENCHMARKS.md). The latents agree to float rounding, but the layouts run
    different kernels, so byte-identical reruns need the same value."""
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
            if any(len(s) != 2 for s in self.scale_schedule):
                raise ValueError(f"scale_schedule must be a list of [h, w] pairs, got {self.scale_schedule}")
            grid = [self.clips.height // SPATIAL_FACTOR, self.clips.width // SPATIAL_FACTOR]
            if [int(v) for v in self.scale_schedule[-1]] != grid:
                raise ValueError(f"scale_schedule must end at the latent grid {grid} of "
                                 f"clips.height x clips.width = {self.clips.height}x{self.clips.width}, "
                                 f"got {list(self.scale_schedule[-1])}")
