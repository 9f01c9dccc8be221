"""VideoAR core attention for Megatron's ``SelfAttention``, and the KV cache it can write to.

Megatron computes q, k, v (column-parallel, heads split over TP) and applies our 3-D RoPE through
``rotary_pos_emb``; this module only does softmax(q·kᵀ/√d + mask)·v for its local heads:

- ``flex``: FlexAttention with a ``BlockMask`` (compiled, block-sparse; CUDA);
- ``sdpa``: ``scaled_dot_product_attention`` with the dense boolean mask (CPU; KV-cached sampling).

Kernel behind ``flex`` (``ModelConfig.flex_kernel``, :func:`choose_flex_kernel`, per sequence layout):
Inductor's Triton kernels, or FlexAttention's FlashAttention-4 backend (FLASH). ``auto`` takes FLASH
where it is installed, the GPU can train it and the sequence is long enough for it to win
(:data:`FLASH_MIN_TOKENS`), else Triton. On Hopper, FA4's tiles let one BlockMask serve forward and
backward only for head_dim 97..128; smaller heads (VideoAR-4B: 80) run zero-padded to 128 with the real
head dim's softmax scale (:func:`attend_with_padded_heads`): exact, gradients included.

Split attention (``ModelConfig.attention_split_tokens``): without a Random Frame Mask drop or window,
a query of (frame t, scale k) sees exactly the valid text keys and every video key before the end of
its block: a contiguous key range with no mask. The large blocks (the last scales of each frame: two
thirds or more of the queries) therefore run as plain SDPA calls over ``keys[:end]`` (FlashAttention
kernels on GPU, which the masked kernels cannot match), one call per block; the remaining queries
(prefix, small scales, pads) go through the masked path as a query subset, and the pieces are put
back in sequence order. Same result as the masked path up to floating-point summation order (tested).
A caption shorter than |Ψ| hides its padded keys: those samples take their keys by concatenation.

Design decision, how per-forward state reaches the core attention: it travels in Megatron's
``attention_bias`` argument as an :class:`AttentionInputs` object. ``attention_mask`` cannot carry a
``BlockMask`` or a cache: full activation recompute hands it to ``tensor_parallel.checkpoint``, whose
``save_for_backward`` accepts tensors only. ``attention_bias`` is forwarded untouched by
``TransformerBlock``/``TransformerLayer``/``SelfAttention`` and reaches the core attention by closure in
both recompute paths (``_checkpointed_forward`` and ``_checkpointed_attention_forward``). State kept on
the module instead would break under pipeline parallelism with recompute: the next microbatch's
forward overwrites it before the previous microbatch's backward recomputes.

KV cache layout (sampling, one forward per (frame, scale) step): per layer (global layer number),
keys and values ``[B, kv_heads_local, S_max, head_dim]`` stored *after* RoPE at their sequence
positions; a step writes its tokens at ``q_start:q_end`` and attends over ``0:q_end`` with mask rows
``q_start:q_end`` from the same mask rule, so the window/causality of cached frames is the mask's job.
"""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from videoar_megatron.model.context_parallel import gather_sequence
from videoar_megatron.model.layout import TokenLayout, index_table
from videoar_megatron.model.mask import compiled_flex_attention

FLEX_KERNEL_OPTIONS = {
    # The general kernel always: for queries shorter than 128 Inductor would pick its decoding kernel,
    # which has no valid config for some small fp32 shapes (NoValidChoicesError).
    "triton": {"FORCE_USE_FLEX_ATTENTION": True},
    "flash": {"BACKEND": "FLASH"},
}
"""``kernel_options`` of the compiled FlexAttention call per chosen kernel (:class:`FlexKernel`)."""

FLASH_SM90_HEAD_DIMS = (97, 128)
"""Head dims FlexAttention's FLASH backend can train block-sparse masks with on Hopper (FA4 4.0). The
forward kernel tiles 192 query rows for head_dim <= 96 and so needs BlockMask query blocks that are a
multiple of 192, while the block-sparse backward needs query blocks of exactly 128: only 97..128 (128
rows forward, 128 keys both ways) satisfies both with one BlockMask. Checked against FA4 on an H200
(tests/test_model_gpu.py). Smaller heads are zero-padded to :data:`FLASH_SM90_PAD_TO` instead."""

FLASH_SM90_PAD_TO = 128
"""Head width that heads below FLASH_SM90_HEAD_DIMS are zero-padded to on Hopper (VideoAR-4B: 80 → 128).
Zero columns add nothing to q·kᵀ, the softmax scale stays the real head dim's, and the output's
padded columns (zero values) are sliced off, so the result and its gradients are unpadded attention's
(:func:`attend_with_padded_heads`). It costs 128/80 = 1.6x the attention's matmul work; Inductor's Triton
kernel rounds head dims up to a power of two as well, so the comparison with it is like for like."""

FLASH_MIN_TOKENS = 4096
"""``model.flex_kernel: auto`` picks FLASH from this sequence length on. Measured (one layer, fwd+bwd,
docs/BENCHMARKS.md): FLASH 1.25x slower than Triton at UCF-101 length (666 tokens, scale blocks of 1..64
tokens: nearly every 128x128 tile is partly masked, where FA4 evaluates the mask per element) and 1.8x
faster at 13,771 (blocks of up to 1,008 tokens: mostly whole tiles). In between nothing is measured yet;
the line sits above stage I's 2,669 tokens (scale blocks of at most 256) and below stage II's 12,839."""


def flash_installed() -> bool:
    """FlashAttention-4's CuTe package (the 'flash' extra) is importable."""
    return importlib.util.find_spec("flash_attn") is not None and importlib.util.find_spec("flash_attn.cute") is not None


FLASH_FRAME_TABLE_CRASH = (
    "FlashAttention-4 crashed the CUDA context through the model whenever the mask reads the Random Frame "
    "Mask's frame table (cudaErrorInvalidAddressSpace in the first step; H100, session 10); the suspected "
    "cause is fixed (layout.INDEX_SLACK) but not yet verified on a GPU (docs/training.md#attention-kernels)")
"""Why FLASH is not used with a windowed or randomly dropped frame context
(``MaskConfig.reads_frame_table``): with VideoAR-4B's heads (padded) and XL's (unpadded) the model's
first forward crashed, while the same kernels ran through the model with the full frame context, and
equal dense SDPA at the attention level with the frame table. Suspected cause (read in FA4 4.0.0b5's
source, session 11): its block-sparse Hopper forward evaluates the mask up to a tile past the sequence
end without wrapping the indices, and the frame-table lookup turned what it read beyond the index
tables into an address; the tables now keep harmless entries there (:data:`.layout.INDEX_SLACK`). The
refusal stays until a GPU confirms it: ``tests/dist_scripts/flash_frame_table.py`` must run as built
and crash with ``--poison-slack``; the GPU test ``test_flash_with_the_frame_table_still_crashes_in_the_model``
(tests/test_model_gpu.py) fails once FLASH runs with the frame table."""


def check_flex_kernel(kernel: str, device: torch.device, head_dim: int | None = None,
                      frame_table: bool = False) -> None:
    """Refuse ``model.flex_kernel=flash`` where it cannot run, before anything is built (else the
    first step would fail inside Inductor's lowering or FlashAttention-4's block-sparse checks, or crash
    the CUDA context: ``frame_table``, the mask reads the Random Frame Mask's frame table)."""
    if kernel != "flash" or device.type != "cuda":
        return
    if frame_table:
        raise ValueError(f"model.flex_kernel=flash with model.mask.rfm_window > 0 or model.mask.rfm_p_mask > 0: "
                         f"{FLASH_FRAME_TABLE_CRASH}; set model.flex_kernel=auto (Triton here) or triton")
    if not flash_installed():
        raise ValueError("model.flex_kernel=flash needs FlashAttention-4 (module flash_attn.cute): install "
                         "the 'flash' extra (pip install -e '.[flash]', see docs/training.md) or set "
                         "model.flex_kernel=auto")
    reason = flash_unsupported(torch.cuda.get_device_capability(device), head_dim)
    if reason:
        raise ValueError(f"model.flex_kernel=flash: {reason}; set model.flex_kernel=auto")


def flash_unsupported(capability: tuple[int, int], head_dim: int | None) -> str | None:
    """Why the FLASH backend cannot train on a GPU of ``capability`` with ``head_dim``, or None
    (on Hopper, heads below 97 are trained zero-padded: :func:`flash_head_padding`)."""
    major, minor = capability
    if major < 9:
        return f"needs a Hopper or newer GPU (compute capability >= 9.0); this one is {major}.{minor}"
    hi = FLASH_SM90_HEAD_DIMS[1]
    if major == 9 and head_dim is not None and head_dim > hi:
        return (f"on Hopper it trains block-sparse masks only with head_dim <= {hi} (FlashAttention-4's "
                f"tiles); this model has head_dim {head_dim} (hidden_size / num_attention_heads)")
    return None


def flash_head_padding(capability: tuple[int, int], head_dim: int) -> int | None:
    """Width to zero-pad heads to for the FLASH backend (None: run them as they are)."""
    if capability[0] == 9 and head_dim < FLASH_SM90_HEAD_DIMS[0]:
        return FLASH_SM90_PAD_TO
    return None


@dataclass(frozen=True)
class FlexKernel:
    """The kernel behind the flex path for one sequence layout, and why it was chosen."""

    name: str
    """Key of :data:`FLEX_KERNEL_OPTIONS`."""
    pad_head_dim: int | None
    """Zero-pad q/k/v heads to this width around the kernel (FLASH on Hopper below head_dim 97)."""
    reason: str
    """One line for the log: the setting and what decided it."""


def choose_flex_kernel(setting: str, seq_len: int, head_dim: int, capability: tuple[int, int] | None,
                       flash_blocker: str | None, context_parallel: bool = False,
                       frame_table: bool = False) -> FlexKernel:
    """The flex kernel for ``model.flex_kernel=setting`` at ``seq_len`` tokens. ``flash_blocker`` says why
    FLASH cannot run here (None: it can; an explicit ``flash`` was checked by :func:`check_flex_kernel`).
    ``context_parallel``: the attention runs a rank's queries against gathered keys through index tables
    (:mod:`.context_parallel`); ``auto`` keeps Triton there, since FLASH has not been run with those
    tables on a GPU yet (its CuTe code generator refused int64 gathers before, docs/training.md).
    ``frame_table``: the mask reads the Random Frame Mask's frame table; ``auto`` keeps Triton
    (:data:`FLASH_FRAME_TABLE_CRASH`)."""
    if setting == "triton":
        return FlexKernel("triton", None, "model.flex_kernel=triton")
    pad = flash_head_padding(capability, head_dim) if capability else None
    padded = f"; heads zero-padded {head_dim} -> {pad} for FlashAttention-4's Hopper tiles" if pad else ""
    if setting == "flash":
        return FlexKernel("flash", pad, f"model.flex_kernel=flash{padded}")
    if flash_blocker:
        return FlexKernel("triton", None, f"auto: FLASH unavailable here ({flash_blocker})")
    if context_parallel:
        return FlexKernel("triton", None, "auto: FLASH not yet verified with context parallelism's index tables "
                                          "(set model.flex_kernel=flash to try it)")
    if frame_table:
        return FlexKernel("triton", None, "auto: the mask reads the Random Frame Mask's frame table (model.mask."
                                          "rfm_window / rfm_p_mask), with which FLASH crashed through the model "
                                          "(docs/training.md#attention-kernels)")
    if seq_len < FLASH_MIN_TOKENS:
        return FlexKernel("triton", None, f"auto: {seq_len} tokens < {FLASH_MIN_TOKENS}, where FLASH is not "
                                          "faster (docs/training.md#attention-kernels)")
    return FlexKernel("flash", pad, f"auto: FlashAttention-4 available and {seq_len} tokens >= {FLASH_MIN_TOKENS}"
                                    f"{padded}")


TRITON = FlexKernel("triton", None, "Triton kernel")
"""The kernel needing nothing beyond torch."""


def flash_blocker(device: torch.device, head_dim: int) -> str | None:
    """Why FlexAttention's FLASH backend cannot train here (device, package, GPU, head dim), or None."""
    if device.type != "cuda":
        return f"device {device.type} runs the dense SDPA path"
    if not flash_installed():
        return "flash-attn-4 is not installed: the 'flash' extra, module flash_attn.cute"
    return flash_unsupported(torch.cuda.get_device_capability(device), head_dim)


def attend_with_padded_heads(attend, q, k, v, width: int, scale: float) -> torch.Tensor:
    """``attend(q, k, v, scale)`` with the head dim of ``[b, heads, s, d]`` q/k/v zero-padded to
    ``width`` and the output sliced back to ``d``. ``scale`` must be the real head dim's (passed
    explicitly: a kernel's default would take 1/√width); see :data:`FLASH_SM90_PAD_TO` for why it is
    exact, gradients included (the pad's backward is a slice, the slice's a zero pad)."""
    d = q.shape[-1]
    out = attend(*(F.pad(x, (0, width - d)) for x in (q, k, v)), scale)
    return out[..., :d]


CACHED_STEP_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
"""SDPA kernels for the masked KV-cached decode steps on CUDA. Measured on an H100 with
benchmarks/check_sample_repro.py (VideoAR-L, bf16, batch 32): under the automatic choice this SDPA was
the first op whose output differed between two decodes of the same batch (every time at batch 32, now
and then at batch 1; one flipped bit changes the rest of the video); with the memory-efficient kernel
every repeat is bit-identical (tests/test_sample_gpu.py)."""


class KVCache:
    """Keys/values of every layer, written step by step at their sequence positions."""

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k_BHsD: torch.Tensor, v_BHsD: torch.Tensor, start: int):
        """Store this step's keys/values at ``start`` and return all keys/values up to its end."""
        end = start + k_BHsD.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions, step ends at {end}")
        if layer not in self.keys:
            shape = (*k_BHsD.shape[:2], self.max_len, k_BHsD.shape[3])
            self.keys[layer] = k_BHsD.new_zeros(shape)
            self.values[layer] = v_BHsD.new_zeros(shape)
        self.keys[layer][:, :, start:end] = k_BHsD
        self.values[layer][:, :, start:end] = v_BHsD
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass(frozen=True)
class SplitPlan:
    """Which queries run unmasked, per layout (see the module docstring)."""

    blocks: tuple[tuple[int, int], ...]
    """``(start, end)`` query ranges; each attends to every valid key before ``end``."""
    rest_S: torch.Tensor
    """Ascending positions of every other query (prefix, small scales, pads): the masked path's query
    table, stored with slack (:data:`~videoar_megatron.model.layout.INDEX_SLACK`)."""
    inverse_S: torch.Tensor
    """Gather index that puts ``cat([rest, block 0, block 1, ...])`` back in sequence order."""
    prefix_len: int


@functools.lru_cache(maxsize=32)
def split_plan(layout: TokenLayout, min_tokens: int, device: str) -> SplitPlan | None:
    """The split of ``layout`` for blocks of at least ``min_tokens`` tokens (None: no such block)."""
    blocks = layout.large_blocks(min_tokens)
    if not blocks:
        return None
    in_block_S = torch.zeros(layout.seq_len, dtype=torch.bool)
    for start, end in blocks:
        in_block_S[start:end] = True
    rest_S = torch.nonzero(~in_block_S).flatten()
    order_S = torch.cat([rest_S, *(torch.arange(start, end) for start, end in blocks)])
    # rest_S is the masked path's query table (``q_positions``): stored with slack (layout.INDEX_SLACK)
    return SplitPlan(blocks, index_table(rest_S, device), torch.argsort(order_S).to(device), layout.prefix_len)


@dataclass
class AttentionInputs:
    """What the core attention of every layer needs for one forward (see the module docstring)."""

    mask_B1QK: torch.Tensor | None = None
    """Dense boolean mask (True = attend) for the sdpa path."""
    block_mask: Any = None
    """FlexAttention ``BlockMask`` for the flex path."""
    kv_cache: KVCache | None = None
    """Cache to write this forward's keys/values into (sampling)."""
    q_start: int = 0
    """Sequence position of this forward's first query (with a cache)."""
    split: SplitPlan | None = None
    """Unmasked large blocks; the mask (``mask_B1QK`` rows / ``block_mask``) then covers ``split.rest_S``."""
    text_len: tuple[int, ...] | None = None
    """Valid prefix length per sample when some caption is padded (split path only; None: all |Ψ|)."""
    flex_kernel: FlexKernel = TRITON
    """Kernel of the flex path (chosen per layout from ``ModelConfig.flex_kernel``)."""
    cp_group: Any = None
    """Context parallelism: gather keys/values over this group before attending (the mask then carries
    the query and key index tables; :mod:`.context_parallel`)."""


class VideoARCoreAttention(MegatronModule):
    """Masked attention over this TP rank's heads; inputs ``[s, b, heads, head_dim]``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", cp_comm_type: str | None = None,
                 softmax_scale: float | None = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        tp = pg_collection.tp.size() if pg_collection is not None else 1
        self.layer_number = layer_number
        self.heads = divide(config.num_attention_heads, tp)
        self.kv_heads = divide(config.num_query_groups or config.num_attention_heads, tp)
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias: AttentionInputs | None = None, packed_seq_params=None):
        if not isinstance(attention_bias, AttentionInputs):
            raise TypeError("VideoARCoreAttention expects AttentionInputs in attention_bias "
                            f"(got {type(attention_bias).__name__}); build the model with VideoARModel")
        if packed_seq_params is not None:
            raise ValueError("packed sequences are not supported by VideoAR attention")
        inputs = attention_bias
        if inputs.cp_group is not None:  # local queries against every rank's keys/values
            key, value = gather_sequence(key, inputs.cp_group), gather_sequence(value, inputs.cp_group)
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(self.layer_number, k, v, inputs.q_start)
        out = videoar_attention(q, k, v, inputs, self.softmax_scale, gqa=self.kv_heads != self.heads)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)


def videoar_attention(q, k, v, inputs: AttentionInputs, scale: float, gqa: bool = False) -> torch.Tensor:
    """softmax(q·kᵀ·scale + mask)·v over ``[b, heads, s, d]`` tensors, by the path ``inputs`` selects."""
    split = inputs.split
    if split is None:
        return _masked(q, k, v, inputs, scale, gqa)
    parts = []
    if len(split.rest_S):
        parts.append(_masked(q.index_select(2, split.rest_S), k, v, inputs, scale, gqa))
    for start, end in split.blocks:
        parts.append(_unmasked(q[:, :, start:end], k, v, end, inputs.text_len, split.prefix_len, scale, gqa))
    return torch.cat(parts, dim=2).index_select(2, split.inverse_S)


def _masked(q, k, v, inputs: AttentionInputs, scale: float, gqa: bool) -> torch.Tensor:
    if inputs.block_mask is not None:
        return _flex(q, k, v, inputs.block_mask, inputs.flex_kernel, scale, gqa)
    if inputs.kv_cache is not None and q.is_cuda:
        with sdpa_kernel(CACHED_STEP_BACKENDS):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask_B1QK, scale=scale,
                                                  enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask_B1QK, scale=scale, enable_gqa=gqa)


def _flex(q, k, v, block_mask, kernel: FlexKernel, scale: float, gqa: bool) -> torch.Tensor:
    def attend(q, k, v, scale):
        return compiled_flex_attention()(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa,
                                         kernel_options=FLEX_KERNEL_OPTIONS[kernel.name])
    if kernel.pad_head_dim is None:
        return attend(q, k, v, scale)
    return attend_with_padded_heads(attend, q, k, v, kernel.pad_head_dim, scale)


def _unmasked(q, k, v, end: int, text_len, prefix_len: int, scale: float, gqa: bool) -> torch.Tensor:
    """Queries that see every valid key before ``end``: no mask, so SDPA may use FlashAttention."""
    if text_len is None:
        return F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], scale=scale, enable_gqa=gqa)

    def visible(x, b, n):  # sample b's keys: its n valid prefix tokens, then the video before `end`
        if n == prefix_len:
            return x[b:b + 1, :, :end]
        return torch.cat([x[b:b + 1, :, :n], x[b:b + 1, :, prefix_len:end]], dim=2)
    return torch.cat([F.scaled_dot_product_attention(q[b:b + 1], visible(k, b, n), visible(v, b, n), scale=scale,
                                                     enable_gqa=gqa)
                      for b, n in enumerate(text_len)])
