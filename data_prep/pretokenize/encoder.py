"""The encoder stage: batches of decoded clips → stored latents and packed multi-scale bits (and
optional caption features), on the worker's device.

The tokenizer is handed in (:mod:`data_prep.tokenizer_api`), already on the device. On CUDA the
encoder runs under bf16 autocast and, by default, as one CUDA graph per batch (:class:`EncoderGraph`),
optionally torch.compile'd first (``encoder_compile``) and in launches of ``encoder_micro_batch`` clips.
Bits are computed from the latent *as stored* (rounded to ``latent_dtype``), so requantizing what the
reader returns reproduces them exactly; a non-finite latent is an error, never written.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch.profiler import record_function

from data_prep import shards
from data_prep.pretokenize.config import MEMORY_FORMATS, PretokenizeConfig, encoder_micro_batch
from data_prep.text_encoder import FrozenTextEncoder
from data_prep.tokenizer_api import EncodingTokenizer
from data_prep.video import frames_to_model_input

PHASES = ("pretokenize.encoder", "pretokenize.quantizer", "pretokenize.to_host")
"""Profiler ranges of :meth:`ClipEncoder.encode`: the tokenizer encoder (with the frames' upload), the
latent rounding and the multi-scale bits, the copies of latents and bits to the host."""


@dataclass
class EncodedBatch:
    latents: list[np.ndarray]
    """Per clip: stored latent ``(T, d, H, W)`` in the storage dtype."""
    bits: list[np.ndarray]
    """Per clip: packed bits uint8 ``(T, L, ceil(d/8))``."""
    text: list[tuple[np.ndarray, np.ndarray]] | None


class ClipEncoder:
    """Tokenizer encoder + multi-scale BSQ bits (+ text features) for batches of decoded clips."""

    def __init__(self, cfg: PretokenizeConfig, tokenizer: EncodingTokenizer, device: torch.device):
        """``tokenizer``: loaded from ``cfg.tokenizer`` onto ``device`` by the caller's loader."""
        self.cfg, self.device = cfg, device
        self.tokenizer = tokenizer
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
        try:  # the tokenizer's quantizer checks the schedule (non-empty, positive, growing)
            self.quantizer = self.tokenizer.quantizer_for(schedule).to(device)
        except ValueError as e:
            raise ValueError(f"scale_schedule: {e}") from None
        self.schedule = [list(s) for s in self.quantizer.scales]
        self.latent_dim = tcfg.latent_dim
        self.encode_dtype = "bfloat16" if device.type == "cuda" else "float32"
        self.memory_format = MEMORY_FORMATS[cfg.encoder_memory_format]
        if self.memory_format == torch.channels_last_3d:
            # Only the encoder runs here. Its convs then get NDHWC inputs: CausalConv3d writes its
            # time-padded input in the weight's layout (see tokenizer.model.CausalConv3d._cat_time).
            self.tokenizer.encoder.to(memory_format=torch.channels_last_3d)
        self.text = FrozenTextEncoder(cfg.text_encoder, device) if cfg.text_encoder.path else None
        self.micro_batch = encoder_micro_batch(cfg, device)  # auto: 4 with NVDEC decode, else the batch
        # Compiled as a function: the tokenizer's modules (and so its content hash) stay as loaded.
        self._compiled_encode = torch.compile(self.tokenizer.encode, dynamic=False) if cfg.encoder_compile else None
        self.graph = None
        if cfg.encoder_cuda_graph and device.type == "cuda":
            c = cfg.clips
            self.graph = EncoderGraph(self._latent, (self.micro_batch, c.num_frames, c.height, c.width, 3), device)

    @torch.no_grad()
    def _latent(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """uint8 frames → continuous latent ``(B, d, T, h, w)`` (bf16 autocast on cuda)."""
        video_BCTHW = frames_to_model_input(frames_BFHWC)
        # cache_enabled=False: the weight-cast cache must not outlive a CUDA graph capture.
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda", cache_enabled=False):
            return (self._compiled_encode or self.tokenizer.encode)(video_BCTHW)

    def _latents(self, frames_BFHWC: torch.Tensor) -> torch.Tensor:
        """The latents ``(B, d, T, h, w)`` of a batch, ``micro_batch`` clips per launch (a graph replay
        when it fits). With several launches the host waits for each before the next: the GPU is then
        idle for a moment between them, and NVDEC decode's queued kernels run in that gap instead of
        after the whole batch."""
        out = []
        for chunk_bFHWC in frames_BFHWC.split(self.micro_batch):
            graphed = self.graph is not None and self.graph.fits(chunk_bFHWC)
            out.append(self.graph(chunk_bFHWC) if graphed else self._latent(chunk_bFHWC))
            if self.device.type == "cuda" and len(frames_BFHWC) > self.micro_batch:
                torch.cuda.current_stream(self.device).synchronize()
        return out[0] if len(out) == 1 else torch.cat(out)

    @torch.no_grad()
    def encode(self, frames: Sequence[torch.Tensor], captions: Sequence[str]) -> EncodedBatch:
        """uint8 frames ``(F, H, W, 3)`` per clip (CPU or CUDA) → stored latents and packed bits.

        Its phases are profiler ranges (``PHASES``), so a torch.profiler trace says where the encoder's
        time goes (benchmarks/bench_pretokenize.py --profile-encoder)."""
        with record_function(PHASES[0]):
            frames_BFHWC = torch.stack([f.to(self.device, non_blocking=True) for f in frames])
            latent_BdTHW = self._latents(frames_BFHWC)
        with record_function(PHASES[1]):
            latent_BTdHW = shards.round_latent(latent_BdTHW.permute(0, 2, 1, 3, 4), self.cfg.latent_dtype)
            self._check_finite(latent_BTdHW, latent_BdTHW, captions)
            b, t, d, h, w = latent_BTdHW.shape
            bits = self.quantizer.latent_to_bits(latent_BTdHW.reshape(b * t, d, h, w))
            bits_BTLd = self.quantizer.flatten_bits(bits).reshape(b, t, -1, d)
        with record_function(PHASES[2]):
            bits_BTLd = bits_BTLd.cpu().numpy()
            latents = shards.latent_to_storage(latent_BTdHW.cpu(), self.cfg.latent_dtype)
        text = None
        if self.text is not None:
            feats, mask = self.text.encode(captions)
            text = list(zip(feats, mask))
        return EncodedBatch(latents=list(latents), bits=[shards.pack_bits(x) for x in bits_BTLd], text=text)

    def _check_finite(self, latent_BTdHW: torch.Tensor, raw_BdTHW: torch.Tensor, captions: Sequence[str]) -> None:
        if not torch.isfinite(latent_BTdHW).all():  # never write NaN/inf (nor bits derived from them)
            bad = (~torch.isfinite(latent_BTdHW)).flatten(1).any(1).nonzero().flatten().tolist()
            raise FloatingPointError(
                f"non-finite latent for clips {bad} of a batch ({', '.join(captions[i] for i in bad[:3])}) after "
                f"rounding to latent_dtype={self.cfg.latent_dtype} (float16 overflows past 65504: use bfloat16); "
                f"the tokenizer output was finite: {bool(torch.isfinite(raw_BdTHW).all())}")

    def shapes(self) -> dict:
        return shards.manifest_shapes(latent_frames=self.latent_frames, latent_dim=self.latent_dim,
                                      latent_hw=self.latent_hw, tokens_per_frame=self.quantizer.tokens_per_frame,
                                      text_shape=self.text.feature_shape if self.text else None)


class EncoderGraph:
    """``fn`` on batches of up to ``shape[0]`` samples, captured once as a CUDA graph and replayed.

    A batch is one launch instead of the encoder's hundreds of kernels, so the encoder's thread stops
    competing with the decode threads for the CPU. A smaller batch (a partition's last, or one with
    rejects) is zero-padded to the captured size: no second set of activations next to the graph's
    (at stage-III sizes one batch's activations fill most of a GPU), and a clip's latents do not depend
    on how full its batch was. The capture runs before any decode thread exists. What it gained on
    which GPU: docs/BENCHMARKS.md.
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
