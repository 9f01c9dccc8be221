"""The VideoAR layer spec: the one place that chooses Megatron modules for the transformer.

LLaMA-style pre-norm layer: RMSNorm → SelfAttention (fused QKV ``ColumnParallelLinear``, our
:class:`VideoARCoreAttention`, ``RowParallelLinear`` output) → RMSNorm → SwiGLU MLP (gate and up fused
in one ``ColumnParallelLinear``, ``RowParallelLinear`` down). No biases anywhere (``add_bias_linear``
is off in :func:`transformer_config`). Local Megatron modules only: the GPU hosts have no Transformer
Engine or apex, and these run on CPU for the tests.

Megatron's local norm (``WrappedTorchNorm``) refuses sequence parallelism, so :class:`VideoARRMSNorm`
is ``torch.nn.RMSNorm`` whose weight carries ``sequence_parallel`` — the attribute Megatron's
``finalize_model_grads`` uses to all-reduce norm gradients over the TP group (each rank saw S/TP tokens).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from videoar_megatron.model.attention import VideoARCoreAttention
from videoar_megatron.model.config import ModelConfig, ParallelConfig


class VideoARRMSNorm(torch.nn.RMSNorm):
    """RMSNorm built the way Megatron builds norms, sequence-parallel aware."""

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)


def get_videoar_layer_spec() -> ModuleSpec:
    """One VideoAR transformer layer."""
    attention = ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.arbitrary},
        submodules=SelfAttentionSubmodules(linear_qkv=ColumnParallelLinear, core_attention=VideoARCoreAttention,
                                           linear_proj=RowParallelLinear, q_layernorm=IdentityOp,
                                           k_layernorm=IdentityOp))
    mlp = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                          linear_fc2=RowParallelLinear))
    return ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
        input_layernorm=VideoARRMSNorm, self_attention=attention, self_attn_bda=get_bias_dropout_add,
        pre_mlp_layernorm=VideoARRMSNorm, mlp=mlp, mlp_bda=get_bias_dropout_add))


def get_videoar_block_spec(config: TransformerConfig, vp_stage: int | None = None,
                           pp_rank: int | None = None) -> TransformerBlockSubmodules:
    """This pipeline stage's layers plus the final RMSNorm (built only on the last stage)."""
    layers = get_num_layers_to_build(config, vp_stage, pp_rank)
    return TransformerBlockSubmodules(layer_specs=[get_videoar_layer_spec()] * layers, layer_norm=VideoARRMSNorm)


_RECOMPUTE = {"none": {}, "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                                   "recompute_num_layers": 1},
              "core_attn": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]}}


def transformer_config(cfg: ModelConfig, parallel: ParallelConfig, *, device: torch.device,
                       params_dtype: torch.dtype = torch.float32) -> TransformerConfig:
    """Megatron ``TransformerConfig`` for a VideoAR model on ``device``."""
    cuda = torch.device(device).type == "cuda"
    return TransformerConfig(
        num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups, ffn_hidden_size=cfg.ffn_hidden_size, kv_channels=cfg.head_dim,
        normalization="RMSNorm", layernorm_epsilon=cfg.norm_eps, gated_linear_unit=True, activation_func=F.silu,
        add_bias_linear=False, add_qkv_bias=False, hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=cfg.init_std,
        tensor_model_parallel_size=parallel.tensor_parallel, pipeline_model_parallel_size=parallel.pipeline_parallel,
        virtual_pipeline_model_parallel_size=parallel.megatron_virtual_stages,
        # Interleaved 1F1B: forward and backward messages in separate, overlapped calls (Megatron-LM's
        # default there). Batched, a stage at PP = 2 sends both to the one neighbour in one call and the
        # receiver cannot tell them apart (Megatron-LM issue 750): the emulated PP=2 x VPP=2 run got
        # wrong losses from the second micro-batch group on.
        overlap_p2p_comm=parallel.virtual_pipeline_stages > 1, batch_p2p_comm=parallel.virtual_pipeline_stages == 1,
        context_parallel_size=parallel.context_parallel, sequence_parallel=parallel.sequence_parallel,
        params_dtype=params_dtype, pipeline_dtype=params_dtype, bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # CPU: Megatron initialises full weights on the host and splits them; CUDA: on device.
        use_cpu_initialization=not cuda,
        # Fused kernels need CUDA (and apex/TE for some): SwiGLU and bias-dropout-add are torch-jit fused.
        bias_activation_fusion=cuda, bias_dropout_fusion=cuda, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        **_RECOMPUTE[parallel.recompute])
