"""VideoAR transformer on Megatron-core: sequence builder, error correction, mask, 3-D RoPE, model.

Module map (each module's docstring states its design decision):

- ``config``: ``ModelConfig`` (+ RoPE/mask/correction/condition/loss sections), ``ParallelConfig``, sizes.
- ``layout``: the token layout and per-token tables every other piece reads.
- ``sequence``: teacher-forced batches (Eq. 6 inputs, targets, random draws) → ``VideoARBatch``.
- ``correction``: cross-frame error correction (Eq. 8).
- ``mask``: the one attention-mask rule (dense for SDPA, FlexAttention ``BlockMask``), Random Frame Mask.
- ``rope``: multi-scale temporal 3-D RoPE (Eq. 7).
- ``attention``: Megatron core attention + KV cache; ``layer_spec``: the layer spec and TransformerConfig.
- ``embedding``, ``loss``, ``model``: prefix/video embeddings, bitwise loss, ``VideoARModel``.
- ``parallel``: Megatron parallel state from ``DistContext``; ``params``: parameter counts.
"""
