"""VideoAR core attention for Megatron's ``SelfAttention``, and the KV cache it can write to.

Megatron computes q, k, v (column-parallel, heads split over TP) and applies our 3-D RoPE through
``rotary_pos_emb``; this module only does softmax(q·kᵀ/√d + mask)·v for its local heads:

- ``flex``: FlexAttention with a ``BlockMask`` (compiled, block-sparse; CUDA);
- ``sdpa``: ``scaled_dot_product_attention`` with the dense boolean mask (CPU; KV-cached sampling).

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

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from videoar_megatron.model.mask import compiled_flex_attention

FLEX_KERNEL_OPTIONS = {"FORCE_USE_FLEX_ATTENTION": True}


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


class VideoARCoreAttention(MegatronModule):
    """Masked attention over this TP rank's heads; inputs ``[s, b, heads, head_dim]``."""

    def __init__(self, config: TransformerConfig, layer_number: int, attn_mask_type=None,
                 attention_type: str = "self", cp_comm_type: str | None = None,
                 softmax_scale: float | None = None, pg_collection=None, **kwargs):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("VideoAR attention does not support context parallelism yet")
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
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))  # [b, heads, s, d]
        if inputs.kv_cache is not None:
            k, v = inputs.kv_cache.update(self.layer_number, k, v, inputs.q_start)
        gqa = self.kv_heads != self.heads
        if inputs.block_mask is not None:
            # The general kernel always: for queries shorter than 128 Inductor would pick its decoding
            # kernel, which has no valid config for some small fp32 shapes (NoValidChoicesError).
            out = compiled_flex_attention()(q, k, v, block_mask=inputs.block_mask, scale=self.softmax_scale,
                                            enable_gqa=gqa, kernel_options=FLEX_KERNEL_OPTIONS)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=inputs.mask_B1QK, scale=self.softmax_scale,
                                                 enable_gqa=gqa)
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)
