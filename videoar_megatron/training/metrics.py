"""Throughput accounting: useful FLOPs of a VideoAR training step, tokens/s, MFU, memory.

FLOPs are *model* FLOPs (what the step needs, not what the kernels execute): 2 per multiply-add of
every weight matrix a token passes through, attention over the (query, key) pairs the VideoAR mask
lets through (QKᵀ and PV: 4 per pair per head dimension), backward = 2 x forward. Activation
recompute and pads are not credited, as in Megatron's and PaLM's MFU. The number of attended pairs is
computed in closed form from the layout (block-causal over (frame, scale), Random Frame Mask window
and drop probability in expectation), so it is exact without building the S x S mask; a test checks
it against the dense mask.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.params import layer_parameters


@dataclass(kw_only=True)
class MetricsConfig:
    """Throughput accounting and the sample audit."""

    peak_tflops: float = 989.0
    """Dense bf16 peak per GPU for MFU (H100/H200 SXM: 989; A100: 312)."""
    audit_sample_ids: bool = True
    """Write the sample ids of every step to ``<run_dir>/sample_ids.jsonl`` (rank 0 gathers them), so
    an audit can prove that no sample was skipped or repeated across interruptions."""

    def __post_init__(self) -> None:
        if self.peak_tflops <= 0:
            raise ValueError(f"peak_tflops must be > 0, got {self.peak_tflops}")


def attended_pairs(layout: TokenLayout, rfm_window: int = 0, rfm_p_mask: float = 0.0,
                   rfm_anchor_first: bool = False) -> float:
    """Expected (query, key) pairs one sample attends to (pads excluded; prefix fully valid)."""
    P, L, T = layout.prefix_len, layout.tokens_per_frame, layout.frames
    cumulative = layout.scale_offsets[1:]
    within = sum(h * w * c for (h, w), c in zip(layout.scales, cumulative))  # same frame, scales <= k
    total = float(P * P)
    for t in range(T):
        in_window = min(t, rfm_window) if rfm_window > 0 else t
        anchored = 1 if rfm_anchor_first and t > 0 else 0  # frame 0: always visible
        droppable = in_window - (1 if anchored and in_window == t else 0)  # frame 0 left to the anchor
        total += L * P + within + L * L * (anchored + droppable * (1.0 - rfm_p_mask))
    return total


def matmul_params_per_token(cfg: ModelConfig) -> int:
    """Weights of the transformer matrices every token multiplies through (norms excluded)."""
    return cfg.num_layers * (layer_parameters(cfg) - 2 * cfg.hidden_size)


def step_flops_per_sample(cfg: ModelConfig, layout: TokenLayout) -> float:
    """Useful training FLOPs (forward + backward) of one sample."""
    tokens = layout.prefix_len + layout.video_len
    h, d = cfg.hidden_size, cfg.latent_dim
    forward = 2.0 * matmul_params_per_token(cfg) * tokens
    forward += 2.0 * 2 * h * d * layout.video_len  # input projection and bit head
    if cfg.condition.kind == "text_features":
        forward += 2.0 * cfg.condition.feature_dim * h * layout.prefix_len
    pairs = attended_pairs(layout, cfg.mask.rfm_window, cfg.mask.rfm_p_mask, cfg.mask.rfm_anchor_first)
    forward += 4.0 * pairs * cfg.num_attention_heads * cfg.head_dim * cfg.num_layers
    return 3.0 * forward


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory since the last call (GiB): CUDA allocator peak, or the process's max RSS on CPU."""
    if device.type == "cuda":
        stats = {"mem_peak_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                 "mem_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
        torch.cuda.reset_peak_memory_stats(device)
        return stats
    return {"mem_rss_max_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def throughput(*, flops_per_sample: float, samples: int, tokens: int, seconds: float, world_size: int,
               peak_tflops: float | None) -> dict[str, float]:
    """tokens/s (total and per rank) and MFU (None on CPU) of one step."""
    out = {"tokens_per_s": tokens / seconds, "tokens_per_s_per_gpu": tokens / seconds / world_size,
           "tflops_per_gpu": flops_per_sample * samples / seconds / world_size / 1e12}
    if peak_tflops:
        out["mfu"] = out["tflops_per_gpu"] / peak_tflops
    return out
