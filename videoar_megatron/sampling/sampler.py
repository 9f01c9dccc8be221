"""KV-cached next-frame / next-scale decoding of the VideoAR transformer.

One window of T latent frames × K scales is decoded in T·K steps (UCF-101: 5 × 6 = 30). Step (t, k)
is one forward of all h_k·w_k tokens of that scale in parallel, attending to the KV cache:

1. the condition prefix (and any known frames, for extension) goes in first, in one forward;
2. step (t, k): logits of scale k of frame t; classifier-free guidance γ(t, k)·cond + (1 − γ)·uncond
   (both branches are rows of one batch of 2B); per-bit sampling (:mod:`.bits`);
3. the sampled bits → codes → upsampled and added to frame t's accumulation F^t_k (the quantizer's
   own ``bits_to_codes``/``upsample``); the input of the next step (Eq. 6) is that accumulation
   downsampled with ``quantizer.scale_input`` to scale k+1, or, after the last scale, to scale 0 of
   frame t+1 (the previous frame's final accumulation); frame 0, scale 0 is ``<SOS>``.

These are the same quantizer calls :func:`videoar_megatron.model.sequence.scale_inputs` makes for the
teacher-forced batch, so feeding the sampled bits back through a full forward reproduces the logits
of every step (tested).

KV cache layout (:class:`videoar_megatron.model.attention.KVCache`): per transformer layer, keys and
values ``[rows, kv_heads / TP, S, head_dim]`` after RoPE, at their sequence positions
``[prefix | frame 0: scale 0 … K-1 | frame 1 | …]``; rows = 2B with guidance (conditional samples
first, then their unconditional twins), B without. Step (t, k) writes its ``h_k·w_k`` positions and
reads ``0 : end of step``; its mask rows come from the model's one mask rule (so the Random Frame Mask
window, when the model has one, holds at inference too). Under tensor parallelism each rank caches
its own heads; every rank decodes the same samples with the same keys, and the bits of every step are
broadcast from TP rank 0, so the ranks cannot drift apart even if their logits differed in the last bit.

Design decisions:

- Static buffers. A :class:`_Plan` (one per batch size, window length, number of known frames)
  owns every tensor the decode touches: the batch (inputs of all N video tokens), the cache, the
  random keys, the sampled bits, the accumulation and the latent. A step only writes into them, reads
  no host value and builds its mask rows on the device, so on CUDA the whole decode (prefix + T·K
  steps) is captured once as one CUDA graph and replayed for every later batch: at batch 1 the cost
  of a step is then the GPU time of ~24 layers, not Python and kernel-launch overhead.
- Fused Megatron kernels (SwiGLU, bias-dropout-add) are ``torch.compile``/TorchScript functions that
  would recompile for every step's token count; the sampler switches them off while it runs (the
  unfused ops are the same math) and restores the model's config afterwards.
- ``kv_cache = False`` recomputes the whole prefix at every step (a fresh cache per step): the
  reference for tests and the baseline of ``benchmarks/bench_sample.py``.
- Pipeline parallelism and sequence parallelism are refused: a decode step has a handful of tokens.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.distributed as dist

from tokenizer.quantizer import MultiScaleBSQ
from videoar_megatron.model.attention import KVCache
from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.sequence import VideoARBatch, build_batch, scale_inputs
from videoar_megatron.sampling.bits import sample_bits, uniform
from videoar_megatron.sampling.cfg import combine, guidance_table, uses_unconditional
from videoar_megatron.sampling.config import SamplingConfig

GRAPH_WARMUP = 2
"""Eager decodes (on a side stream) before a CUDA graph is captured."""
MAX_PLANS = 4
"""Plans (static buffers, caches, graphs) kept per sampler, least recently used dropped first."""


@dataclass
class Conditions:
    """The condition of each of B samples, in the model's condition kind."""

    kind: str
    """'class', 'text_tokens', 'text_features' or 'none' (ModelConfig.condition.kind)."""
    count: int
    """B."""
    class_B: torch.Tensor | None = None
    """Class labels (kind class)."""
    text_BP: torch.Tensor | None = None
    """Caption token ids ``(B, |Ψ|)`` or features ``(B, |Ψ|, D)``, padded (text kinds)."""
    text_len_B: torch.Tensor | None = None
    """Valid caption length per sample (text kinds; None: all |Ψ|)."""

    @classmethod
    def labels(cls, labels) -> "Conditions":
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
        return cls(kind="class", count=len(labels), class_B=labels)

    @classmethod
    def unconditional(cls, count: int) -> "Conditions":
        return cls(kind="none", count=count)

    @classmethod
    def text(cls, kind: str, text_BP: torch.Tensor, text_len_B=None) -> "Conditions":
        lens = None if text_len_B is None else torch.as_tensor(text_len_B, dtype=torch.long).reshape(-1)
        return cls(kind=kind, count=text_BP.shape[0], text_BP=text_BP, text_len_B=lens)

    def select(self, index: slice) -> "Conditions":
        take = lambda x: None if x is None else x[index]  # noqa: E731
        return dataclasses.replace(self, count=len(range(self.count)[index]), class_B=take(self.class_B),
                                   text_BP=take(self.text_BP), text_len_B=take(self.text_len_B))

    def check(self, cfg: ModelConfig) -> None:
        """Errors that name the condition the checkpoint expects."""
        c = cfg.condition
        if self.kind != c.kind:
            raise ValueError(f"the checkpoint is conditioned on '{c.kind}' (model_config.condition.kind) "
                             f"but the samples have '{self.kind}' conditions")
        if self.kind == "class" and (self.class_B.min() < 0 or self.class_B.max() >= c.num_classes):
            raise ValueError(f"class labels must be in [0, {c.num_classes}) (model_config.condition.num_classes), "
                             f"got {self.class_B.tolist()}")
        if self.kind in ("text_tokens", "text_features") and self.text_BP.shape[1] != cfg.prefix_len:
            raise ValueError(f"captions must be padded to model_config.condition.text_len={cfg.prefix_len}, "
                             f"got {self.text_BP.shape[1]}")


@dataclass
class SampleOutput:
    """One decoded window of B samples (all tensors on the sampler's device)."""

    bits_BTLd: torch.Tensor
    """Bits of every latent frame (known frames included), bool ``(B, T, L, d)``."""
    latent_BdTHW: torch.Tensor
    """Quantized latent: each frame's final accumulation of codes, float32 ``(B, d, T, H, W)``."""
    logits_BTLd: torch.Tensor | None
    """Guided logits of every sampled step (before temperature), float32; zeros at known frames.
    Only with ``record_logits``."""
    known_frames: int
    """Latent frames that were given (teacher-forced), not sampled."""


@contextlib.contextmanager
def inference_config(model):
    """Eval mode, no autograd, and Megatron's compiled fused kernels off (restored on exit)."""
    cfg = model.config
    saved = (cfg.bias_activation_fusion, cfg.bias_dropout_fusion, model.training)
    cfg.bias_activation_fusion = cfg.bias_dropout_fusion = False
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        cfg.bias_activation_fusion, cfg.bias_dropout_fusion = saved[0], saved[1]
        model.train(saved[2])


class VideoARSampler:
    """Decodes windows of latent frames from a VideoAR model (any TP size, one pipeline stage)."""

    def __init__(self, model, quantizer: MultiScaleBSQ, model_cfg: ModelConfig, cfg: SamplingConfig, *,
                 window_frames: int, tp_group=None):
        if not (model.pre_process and model.post_process):
            raise ValueError("sampling needs the whole model on every rank: parallel.pipeline_parallel must be 1")
        if model.config.sequence_parallel:
            raise ValueError("sampling runs without sequence parallelism (a step has a handful of tokens)")
        if quantizer.dim != model_cfg.latent_dim:
            raise ValueError(f"the tokenizer has {quantizer.dim} bits per token, the model latent_dim="
                             f"{model_cfg.latent_dim}")
        self.model, self.quantizer, self.model_cfg, self.cfg = model, quantizer, model_cfg, cfg
        self.window = window_frames
        self.device = next(model.parameters()).device
        self.tp_group = tp_group if tp_group is not None and tp_group.size() > 1 else None
        self._plans: OrderedDict[tuple, _Plan] = OrderedDict()

    @property
    def latent_hw(self) -> tuple[int, int]:
        return self.quantizer.latent_hw

    def generate(self, cond: Conditions, keys_B: torch.Tensor, *, frames: int | None = None,
                 known_bits_BTLd: torch.Tensor | None = None, record_logits: bool = False) -> SampleOutput:
        """Decode ``frames`` latent frames (default: a window) for B samples.

        ``keys_B``: 32-bit random keys, one per sample (:func:`.bits.sample_key`). ``known_bits_BTLd``:
        bits of the first c < frames latent frames, teacher-forced into the cache (extension).
        """
        T = frames or self.window
        c = 0 if known_bits_BTLd is None else known_bits_BTLd.shape[1]
        if not 1 <= T <= self.window:
            raise ValueError(f"a window holds 1..{self.window} latent frames (the checkpoint's latent_frames); "
                             f"asked for {T}: longer videos are decoded window by window (sampling.extend)")
        if c >= T:
            raise ValueError(f"{c} known latent frames leave nothing to decode in a window of {T}")
        cond.check(self.model_cfg)
        if len(keys_B) != cond.count:
            raise ValueError(f"{len(keys_B)} random keys for {cond.count} samples")
        plan = self._plan(cond.count, T, c, record_logits)
        with inference_config(self.model):
            plan.load(cond, keys_B, known_bits_BTLd)
            plan.execute()
            return plan.output()

    def _plan(self, B: int, T: int, c: int, record: bool) -> "_Plan":
        key = (B, T, c, record)
        if key not in self._plans:
            while len(self._plans) >= MAX_PLANS:
                self._plans.popitem(last=False)
            self._plans[key] = _Plan(self, B, T, c, record)
        self._plans.move_to_end(key)
        return self._plans[key]


class _Plan:
    """Static buffers and the decode loop for one (B, T, known frames) shape; see the module doc."""

    def __init__(self, s: VideoARSampler, B: int, T: int, known: int, record: bool):
        q, mcfg, dev = s.quantizer, s.model_cfg, s.device
        self.s, self.B, self.T, self.known = s, B, T, known
        self.K, self.L, self.d = len(q.scales), q.tokens_per_frame, q.dim
        self.gamma_TK = guidance_table(s.cfg.guidance, T, self.K).tolist()
        # Guidance needs a condition to drop; an unconditional model has a single branch.
        self.cfg_on = mcfg.condition.kind != "none" and uses_unconditional(torch.tensor(self.gamma_TK))
        self.rows = 2 * B if self.cfg_on else B
        self.batch = self._template_batch(s, self.rows, T)
        self.layout = self.batch.layout
        N = self.layout.video_len
        H, W = q.latent_hw
        self.keys_B = torch.zeros(B, dtype=torch.int64, device=dev)
        self.bits_BNd = torch.zeros(B, N, self.d, dtype=torch.bool, device=dev)
        self.latent_BdTHW = torch.zeros(B, self.d, T, H, W, device=dev)
        self.accum_BdHW = torch.zeros(B, self.d, H, W, device=dev)
        self.logits_BNd = torch.zeros(B, N, self.d, device=dev) if record else None
        self.cache = KVCache(self.layout.seq_len)
        self.graph = None
        self.graph_error: str | None = None

    # --- buffers ----------------------------------------------------------------------------------
    def _template_batch(self, s: VideoARSampler, rows: int, T: int) -> VideoARBatch:
        """Shapes, mask tables and condition fields from the public batch builder (zero bits); the
        inputs become the decode's static buffer and the second half of the rows the null condition."""
        mcfg, q, dev = s.model_cfg, s.quantizer, s.device
        kind, P = mcfg.condition.kind, mcfg.prefix_len
        dummy = {"class": lambda: torch.zeros(rows, dtype=torch.long),
                 "text_tokens": lambda: torch.zeros(rows, P, dtype=torch.long),
                 "text_features": lambda: torch.zeros(rows, P, mcfg.condition.feature_dim),
                 "none": lambda: None}[kind]()
        bits = torch.zeros(rows, T, q.tokens_per_frame, q.dim, dtype=torch.bool, device=dev)
        batch = build_batch(q, mcfg, bits_BTLd=bits, cond=None if dummy is None else dummy.to(dev), training=False)
        drop = torch.zeros(rows, dtype=torch.bool, device=dev)
        drop[self.B:] = True  # rows B..2B-1: the unconditional branch (none when rows == B)
        return dataclasses.replace(batch, inputs_BNd=torch.zeros_like(batch.inputs_BNd), cond_drop_B=drop)

    def _halves(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, ...) repeated for the rows of the batch (conditional, then unconditional)."""
        return torch.cat([x, x]) if self.cfg_on else x

    def load(self, cond: Conditions, keys_B: torch.Tensor, known_bits_BTLd: torch.Tensor | None) -> None:
        """Copy one batch's conditions, keys and known frames into the static buffers."""
        b, dev = self.batch, self.s.device
        if cond.class_B is not None:
            b.class_B.copy_(self._halves(cond.class_B.to(dev)))
        if cond.text_BP is not None:
            field = "text_ids_BP" if cond.kind == "text_tokens" else "text_feat_BPD"
            getattr(b, field).copy_(self._halves(cond.text_BP.to(dev)))
            lens = cond.text_len_B if cond.text_len_B is not None else torch.full((cond.count,), self.layout.prefix_len)
            if lens.min() < 1 or lens.max() > self.layout.prefix_len:
                raise ValueError(f"caption lengths must be in [1, {self.layout.prefix_len}], got {lens.tolist()}")
            b.text_len_B.copy_(self._halves(lens.to(dev)))
        self.keys_B.copy_(torch.as_tensor(keys_B, dtype=torch.int64).to(dev))
        if self.known:
            self._load_known(known_bits_BTLd.to(dev).bool())

    def _load_known(self, bits_BcLd: torch.Tensor) -> None:
        q, B, c, L, d = self.s.quantizer, self.B, self.known, self.L, self.d
        if bits_BcLd.shape != (B, c, L, d):
            raise ValueError(f"known bits must be (B={B}, frames={c}, L={L}, d={d}), got {tuple(bits_BcLd.shape)}")
        accum = q.accumulate(q.unflatten_bits(bits_BcLd.reshape(B * c, L, d)))
        self._write_inputs(slice(0, c * L), scale_inputs(q, accum, B, c))
        self.bits_BNd[:, :c * L] = bits_BcLd.reshape(B, c * L, d)
        final = accum[-1].reshape(B, c, *accum[-1].shape[1:])
        self.latent_BdTHW[:, :, :c] = final.transpose(1, 2)
        self._write_next_frame_input(c, final[:, -1])

    def _write_inputs(self, video: slice, x_BnD: torch.Tensor) -> None:
        inputs = self.batch.inputs_BNd
        if self.cfg_on:
            inputs.view(2, self.B, *inputs.shape[1:])[:, :, video] = x_BnD
        else:
            inputs[:, video] = x_BnD

    def _video_slice(self, t: int, k: int) -> slice:
        s, P = self.layout.step_slice(t, k), self.layout.prefix_len
        return slice(s.start - P, s.stop - P)

    def _write_next_frame_input(self, t: int, accum_BdHW: torch.Tensor) -> None:
        """Eq. 6 input of (t, 0): frame t-1's final accumulation at scale 0's size."""
        x = self.s.quantizer.scale_input(accum_BdHW, 0)
        self._write_inputs(self._video_slice(t, 0), x.flatten(2).transpose(1, 2))

    # --- the decode -------------------------------------------------------------------------------
    def run(self) -> None:
        """Prefix (+ known frames) then every (frame, scale) step; reads and writes buffers only."""
        if self.s.cfg.kv_cache:
            prefill = self.layout.prefix_len + self.known * self.L
            if prefill:
                self.s.model(self.batch, kv_cache=self.cache, positions=slice(0, prefill))
        for t in range(self.known, self.T):
            for k in range(self.K):
                self.step(t, k)

    def step(self, t: int, k: int) -> None:
        s, q, B = self.s, self.s.quantizer, self.B
        seq, video = self.layout.step_slice(t, k), self._video_slice(t, k)
        h, w = q.scales[k]
        if s.cfg.kv_cache:
            logits = s.model(self.batch, kv_cache=self.cache, positions=seq)
        else:  # reference: recompute everything before and including this step
            logits = s.model(self.batch, kv_cache=KVCache(seq.stop), positions=slice(0, seq.stop))[:, -h * w:]
        gamma = self.gamma_TK[t][k]
        z = combine(logits[:B], logits[B:], gamma) if self.cfg_on else logits.float()
        if self.logits_BNd is not None:
            self.logits_BNd[:, video] = z
        u = uniform(self.keys_B, t * self.K + k, h * w, self.d)
        bits = sample_bits(z, u, s.cfg.temperature, s.cfg.top_p)
        if s.tp_group is not None:
            bits = self._broadcast(bits)
        self.bits_BNd[:, video] = bits
        up = q.upsample(q.bits_to_codes(bits.view(B, h, w, self.d)))
        if k == 0:
            self.accum_BdHW.copy_(up)
        else:
            self.accum_BdHW.add_(up)
        if k + 1 < self.K:
            x = q.scale_input(self.accum_BdHW, k + 1)
            self._write_inputs(self._video_slice(t, k + 1), x.flatten(2).transpose(1, 2))
            return
        self.latent_BdTHW[:, :, t] = self.accum_BdHW
        if t + 1 < self.T:
            self._write_next_frame_input(t + 1, self.accum_BdHW)

    def _broadcast(self, bits: torch.Tensor) -> torch.Tensor:
        """TP rank 0's bits on every TP rank (identical logits make this a no-op; it guarantees it)."""
        group = self.s.tp_group
        data = bits.to(torch.uint8)
        dist.broadcast(data, src=dist.get_global_rank(group, 0), group=group)
        return data.bool()

    # --- execution ----------------------------------------------------------------------------------
    def execute(self) -> None:
        s = self.s
        use_graph = s.cfg.cuda_graph and s.cfg.kv_cache and s.device.type == "cuda" and self.graph_error is None
        if not use_graph:
            self.run()
            return
        if self.graph is None:
            self._capture()
        if self.graph is not None:
            self.graph.replay()

    def _capture(self) -> None:
        """Warm up on a side stream (allocates the cache, settles lazy init), then capture ``run``."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(GRAPH_WARMUP):
                self.run()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self.run()
        except Exception as e:  # noqa: BLE001 - fall back to eager decoding, loudly
            self.graph_error = f"{type(e).__name__}: {e}"
            warnings.warn(f"CUDA graph capture of the decode failed, decoding eagerly: {self.graph_error}")
            torch.cuda.synchronize()
            self.run()
            return
        self.graph = graph

    def output(self) -> SampleOutput:
        B, T, L, d = self.B, self.T, self.L, self.d
        logits = None if self.logits_BNd is None else self.logits_BNd.view(B, T, L, d).clone()
        return SampleOutput(bits_BTLd=self.bits_BNd.view(B, T, L, d).clone(),
                            latent_BdTHW=self.latent_BdTHW.clone(), logits_BTLd=logits, known_frames=self.known)
