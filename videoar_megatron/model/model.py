"""The VideoAR transformer on Megatron-core: embeddings → ``TransformerBlock`` → bit head.

Forward of one pipeline stage, given a :class:`VideoARBatch` (every stage gets the batch: the mask and
RoPE need its layout, frame-mask table and prefix lengths; only the first stage reads the inputs and
only the last the targets):

1. first stage: embed the prefix and the video inputs → ``[S, B, C]``; with sequence parallelism,
   scatter to ``[S/TP, B, C]``. Other stages: the block's input comes from ``set_input_tensor``.
2. every stage: 3-D RoPE angles ``[S, 1, 1, head_dim]`` (Megatron ``rotary_pos_emb``) and the
   :class:`AttentionInputs` (dense mask or FlexAttention ``BlockMask``; passed as ``attention_bias``,
   see :mod:`.attention` for why), then the Megatron ``TransformerBlock``.
3. last stage: (gather the sequence,) final RMSNorm (inside the block), bit head on the video tokens
   → logits ``(B, N, d)``; :func:`videoar_megatron.model.loss.bit_loss` turns them into the loss.

Under context parallelism (``parallel.context_parallel`` > 1) a rank runs its share of the sequence
(:mod:`.context_parallel`): embeddings, RoPE angles and mask rows at its positions, keys/values gathered
over the CP group inside attention, the head on its video tokens → logits ``(B, n, d)`` of the tokens
:meth:`VideoARModel.video_index_n` names.

Sampling (issue 8) calls :meth:`VideoARModel.forward` with a :class:`KVCache` and the sequence slice of
one (frame, scale) step; the mask rows and RoPE angles of that slice come from the same definitions.
"""
from __future__ import annotations

import functools

import torch
from megatron.core import tensor_parallel
from megatron.core.enums import ModelType
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_block import TransformerBlock
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import nn

from videoar_megatron.model import mask as mask_lib
from videoar_megatron.model.attention import (AttentionInputs, FlexKernel, KVCache, check_flex_kernel,
                                              choose_flex_kernel, flash_blocker, split_plan)
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.context_parallel import ContextSplit, check_context_parallel, context_split
from videoar_megatron.model.embedding import VideoAREmbedding
from videoar_megatron.model.layer_spec import get_videoar_block_spec, transformer_config
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.parallel import stage_flags
from videoar_megatron.model.rope import positions, rotary_angles
from videoar_megatron.model.sequence import VideoARBatch


@functools.lru_cache(maxsize=32)
def _rope_angles(layout: TokenLayout, device: str, head_dim: int, base: float, split, axis_layout: str,
                 grid: str) -> torch.Tensor:
    tables = layout.tables(device)
    return rotary_angles(positions(layout, tables, grid), head_dim, base=base, split=split, layout=axis_layout)


class VideoARModel(MegatronModule):
    """One pipeline stage (or the whole model) of the VideoAR transformer."""

    def __init__(self, cfg: ModelConfig, config: TransformerConfig, pg_collection: ProcessGroupCollection, *,
                 pre_process: bool = True, post_process: bool = True, vp_stage: int | None = None,
                 cp_chunk: int = 128):
        super().__init__(config=config)
        self.model_type = ModelType.encoder_or_decoder  # read by Megatron's pipeline schedules
        # Read by Megatron's finalize_model_grads under PP: no weights are tied across stages.
        self.share_embeddings_and_output_weights = False
        self.cfg, self.pg_collection = cfg, pg_collection
        self.pre_process, self.post_process = pre_process, post_process
        self.tp_size = pg_collection.tp.size()
        self.cp_size, self.cp_chunk = config.context_parallel_size, cp_chunk
        # Benchmarks set it to price the split machinery at CP=1 (a one-rank split: index-table mask,
        # gather bypassed); training splits exactly when context_parallel > 1.
        self.always_split = False
        if pre_process:
            self.embedding = VideoAREmbedding(cfg, config.params_dtype)
        spec = get_videoar_block_spec(config, vp_stage, pg_collection.pp.rank())
        self.decoder = TransformerBlock(config, spec, pre_process=pre_process, post_process=post_process,
                                        pg_collection=pg_collection, vp_stage=vp_stage)
        if post_process:
            self.head = nn.Linear(cfg.hidden_size, cfg.latent_dim, bias=False, dtype=config.params_dtype)
            nn.init.normal_(self.head.weight, std=cfg.init_std)
        # Until probe_kernels (build_model calls it) auto stays on Triton.
        self._flash_blocker: str | None = "the device was not probed (VideoARModel.probe_kernels)"
        self._capability: tuple[int, int] | None = None

    def set_input_tensor(self, input_tensor) -> None:
        """Pipeline schedules hand the previous stage's output here."""
        if isinstance(input_tensor, (list, tuple)):
            input_tensor = input_tensor[0]
        self.decoder.set_input_tensor(input_tensor)

    # --- per-forward inputs -----------------------------------------------------------------
    def backend(self, device: torch.device) -> str:
        if self.cfg.attention_backend == "auto":
            return "flex" if device.type == "cuda" else "sdpa"
        return self.cfg.attention_backend

    def probe_kernels(self, device: torch.device) -> None:
        """Record once what the flex kernel choice depends on here (GPU generation, FA4 installed)."""
        self._flash_blocker = flash_blocker(device, self.cfg.head_dim)
        self._capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None

    def flex_kernel_for(self, seq_len: int) -> FlexKernel:
        """The flex kernel of a ``seq_len``-token layout (``model.flex_kernel``; logged by the trainer)."""
        return choose_flex_kernel(self.cfg.flex_kernel, seq_len, self.cfg.head_dim, self._capability,
                                  self._flash_blocker, context_parallel=self.cp_size > 1 or self.always_split,
                                  frame_table=self.cfg.mask.reads_frame_table)

    def rope(self, layout: TokenLayout, device: torch.device) -> torch.Tensor:
        r = self.cfg.rope
        return _rope_angles(layout, str(device), self.cfg.head_dim, r.base, r.axis_split, r.axis_layout, r.grid)

    def context_split(self, layout: TokenLayout, device: torch.device) -> ContextSplit | None:
        """This rank's share of the sequence under context parallelism (None: the whole sequence)."""
        if self.cp_size == 1 and not self.always_split:
            return None
        cp = self.pg_collection.cp
        chunk = self.cp_chunk if cp.size() > 1 else 1  # one rank holds every token: no padding needed
        return context_split(layout, cp.size(), cp.rank(), chunk, self.cfg.mask.rfm_window, str(device))

    def video_index_n(self, layout: TokenLayout, device: torch.device) -> torch.Tensor | None:
        """Which video tokens this rank's logits are (:func:`~videoar_megatron.model.loss.bit_loss`'s
        ``video_index_n``; None: all of them, in order)."""
        split = self.context_split(layout, device)
        return None if split is None else split.video_index_n

    def split_attention_inputs(self, batch: VideoARBatch, split: ContextSplit) -> AttentionInputs:
        """Mask of this rank's queries against the keys gathered over the CP group, by index tables."""
        device = batch.frame_visible_BTT.device
        tables = batch.layout.tables(device)
        text_len = batch.text_len_B.masked_fill(batch.cond_drop_B, batch.layout.prefix_len)
        full = mask_lib.is_full_context(batch.frame_visible_BTT)
        inputs = AttentionInputs(flex_kernel=self.flex_kernel_for(batch.layout.seq_len), cp_group=self.pg_collection.cp)
        tabled = {"full_context": full, "q_positions": split.mask_q_S, "kv_positions": split.mask_kv_S}
        if self.backend(device) == "flex":
            inputs.block_mask = mask_lib.block_mask(tables, batch.frame_visible_BTT, text_len, **tabled)
        else:
            inputs.mask_B1QK = mask_lib.dense_mask(tables, batch.frame_visible_BTT, text_len, **tabled)
        return inputs

    def attention_inputs(self, batch: VideoARBatch, positions: slice, kv_cache: KVCache | None) -> AttentionInputs:
        device = batch.frame_visible_BTT.device
        tables = batch.layout.tables(device)
        text_len = batch.text_len_B.masked_fill(batch.cond_drop_B, batch.layout.prefix_len)
        if kv_cache is not None or positions != slice(0, batch.layout.seq_len):
            rows = mask_lib.dense_mask(tables, batch.frame_visible_BTT, text_len, positions.start, positions.stop)
            return AttentionInputs(mask_B1QK=rows, kv_cache=kv_cache, q_start=positions.start)
        full = mask_lib.is_full_context(batch.frame_visible_BTT)
        split = split_plan(batch.layout, self.cfg.attention_split_tokens, str(device)) if full else None
        rows = None if split is None else split.rest_S
        inputs = AttentionInputs(split=split, flex_kernel=self.flex_kernel_for(batch.layout.seq_len))
        if split is not None:
            lens = text_len.tolist()
            inputs.text_len = None if min(lens) == batch.layout.prefix_len else tuple(lens)
            if not len(rows):
                return inputs
        if self.backend(device) == "flex":
            inputs.block_mask = mask_lib.block_mask(tables, batch.frame_visible_BTT, text_len, full_context=full,
                                                    q_positions=rows)
        else:
            inputs.mask_B1QK = mask_lib.dense_mask(tables, batch.frame_visible_BTT, text_len, full_context=full,
                                                   q_positions=rows)
        return inputs

    # --- forward ------------------------------------------------------------------------------
    def forward(self, batch: VideoARBatch, *, kv_cache: KVCache | None = None,
                positions: slice | None = None) -> torch.Tensor:
        """Logits ``(B, n_video, d)`` on the last stage, hidden states ``[s(/TP), B, C]`` elsewhere.

        ``positions``: the sequence slice to run (default: all of it); slices other than the whole
        sequence need ``kv_cache`` holding every earlier position (sampling).
        """
        layout = batch.layout
        device = batch.frame_visible_BTT.device
        split = self.context_split(layout, device)
        if split is not None and (kv_cache is not None or positions is not None):
            raise ValueError("a context-parallel model runs whole training sequences; KV-cached sampling "
                             "runs unsplit (parallel.context_parallel=1)")
        positions = positions or slice(0, layout.seq_len)
        if positions != slice(0, layout.seq_len) and kv_cache is None:
            raise ValueError("a partial forward needs the KV cache of the positions before it")
        sp = self.config.sequence_parallel
        local_len = layout.seq_len if split is None else len(split.local_S)
        if sp and (kv_cache is not None or local_len % self.tp_size):
            raise ValueError(f"sequence parallelism needs the full sequence with a length divisible by "
                             f"parallel.tensor_parallel={self.tp_size} (got {local_len} tokens on this rank); "
                             f"build the batch with pad_to_multiple=context_parallel.sequence_multiple(parallel)")
        # This rank's tokens: a sequence slice, or its context-parallel share (by positions).
        mine = positions if split is None else split.local_S
        hidden = None
        if self.pre_process:
            tables = layout.tables(device)
            hidden = (self.embedding(batch, tables, positions) if split is None
                      else self.embedding.at_positions(batch, tables, split.local_S))
            if sp:
                hidden = tensor_parallel.scatter_to_sequence_parallel_region(hidden, group=self.pg_collection.tp)
        rope = self.rope(layout, device)[mine]
        attn = (self.attention_inputs(batch, positions, kv_cache) if split is None
                else self.split_attention_inputs(batch, split))
        hidden = self.decoder(hidden, None, rotary_pos_emb=rope, attention_bias=attn)
        if not self.post_process:
            return hidden
        if sp:
            # The head is replicated: every rank holds the full loss, so backward just splits.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(
                hidden, tensor_parallel_output_grad=False, group=self.pg_collection.tp)
        rows = (self._video_rows(hidden, layout, positions) if split is None
                else hidden.index_select(0, split.video_rows_s))
        return self.head(rows).transpose(0, 1)

    @staticmethod
    def _video_rows(hidden_sBC: torch.Tensor, layout: TokenLayout, positions: slice) -> torch.Tensor:
        P, N = layout.prefix_len, layout.video_len
        start, stop = max(positions.start, P), min(positions.stop, P + N)
        return hidden_sBC[start - positions.start:max(stop, start) - positions.start]


def build_model(cfg: ModelConfig, parallel: ParallelConfig, groups: ProcessGroupCollection, *,
                device: torch.device | str = "cpu", params_dtype: torch.dtype = torch.float32,
                pre_process: bool | None = None, post_process: bool | None = None,
                vp_stage: int | None = None, config: TransformerConfig | None = None) -> VideoARModel:
    """This rank's VideoAR model (stage flags from the pipeline rank unless given), on ``device``.
    ``config``: the Megatron config to share with this rank's other chunks (default: a new one)."""
    device = torch.device(device)
    check_flex_kernel(cfg.flex_kernel, device, cfg.hidden_size // cfg.num_attention_heads, cfg.mask.reads_frame_table)
    sizes = (groups.tp.size(), groups.cp.size(), groups.pp.size())
    if sizes != (parallel.tensor_parallel, parallel.context_parallel, parallel.pipeline_parallel):
        raise ValueError(f"process groups (tp={sizes[0]}, cp={sizes[1]}, pp={sizes[2]}) do not match "
                         f"parallel.tensor_parallel={parallel.tensor_parallel}, "
                         f"parallel.context_parallel={parallel.context_parallel}, "
                         f"parallel.pipeline_parallel={parallel.pipeline_parallel}")
    check_context_parallel(cfg, parallel)
    first, last = stage_flags(groups)
    config = config or transformer_config(cfg, parallel, device=device, params_dtype=params_dtype)
    with torch.device(device):
        model = VideoARModel(cfg, config, groups, vp_stage=vp_stage, cp_chunk=parallel.context_parallel_chunk,
                             pre_process=first if pre_process is None else pre_process,
                             post_process=last if post_process is None else post_process)
    model = model.to(device)
    model.probe_kernels(device)
    return model


def build_model_chunks(cfg: ModelConfig, parallel: ParallelConfig, groups: ProcessGroupCollection, *,
                       device: torch.device | str = "cpu",
                       params_dtype: torch.dtype = torch.float32) -> list[VideoARModel]:
    """This rank's model chunks: one model, or with ``parallel.virtual_pipeline_stages`` = v > 1 the v
    chunks of Megatron's interleaved schedule (chunk i = virtual stage i x PP + pipeline rank, its layers
    placed by Megatron's ``get_transformer_layer_offset``; only chunk 0 of the first rank embeds and only
    the last chunk of the last rank has the head). The chunks share one Megatron config, which the
    schedule reads from the first."""
    v = parallel.virtual_pipeline_stages
    if v == 1:
        return [build_model(cfg, parallel, groups, device=device, params_dtype=params_dtype)]
    config = transformer_config(cfg, parallel, device=torch.device(device), params_dtype=params_dtype)
    first, last = stage_flags(groups)
    return [build_model(cfg, parallel, groups, device=device, params_dtype=params_dtype, vp_stage=i, config=config,
                        pre_process=first and i == 0, post_process=last and i == v - 1) for i in range(v)]
