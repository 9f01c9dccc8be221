"""Run under torchrun: a context-parallel VideoAR model (CP=2, optionally x TP=2 with sequence
parallelism) gives the loss and the gradients of the unsplit TP=1, CP=1 model it was copied from.

Every rank: build the unsplit model, run forward/backward on a fixed batch (padded for the CP layout, so
both see the same sequence); re-initialise Megatron with CP=2 (x TP=2 + SP + GQA with ``--tp 2``, 4
ranks), copy (shard) the weights, run the same batch, each CP rank on its share with the loss the
engines compute (``bit_loss`` with the model's ``video_index_n``). Then, as the engines' reductions
would: sequence-parallel norm gradients summed over TP; CP ranks' losses and gradients summed over the
CP group; TP shards gathered. Writes ``<OUT>/<mode>_rank<r>.json`` with the largest relative
differences for every mode.

Modes: ``plain`` (class condition, no Random Frame Mask), ``rfm_window`` (window 2 + drop 0.3),
``text_weights`` (text features with padded captions, GQA, InfinityStar scale reweighting times
explicit per-scale weights: non-uniform token weights).

Usage: cp_parity.py OUT_DIR {cpu|cuda} TP MODE [MODE ...]
"""
import contextlib
import json
import sys

import torch
import torch.distributed as dist

from tests.tp_shards import allreduce_sequence_parallel_grads, shard, unshard
from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.context_parallel import sequence_multiple
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.model import build_model
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.model.sequence import build_batch
from videoar_megatron.training.cuda_compat import host_current_device

OUT, DEVICE, TP, MODES = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
BASE = {"size": "custom", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "latent_dim": 8}
MODE_CONFIGS = {
    "plain": {"condition": {"kind": "class", "num_classes": 10, "tokens_per_class": 3}},
    "rfm_window": {"condition": {"kind": "class", "num_classes": 10, "tokens_per_class": 3},
                   "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}},
    "text_weights": {"num_query_groups": 2,
                     "condition": {"kind": "text_features", "text_len": 5, "feature_dim": 12, "dropout": 0.3},
                     "loss": {"scale_reweight": 2, "max_reweight": 3.0, "scale_weights": [0.5, 1.0, 2.0, 1.5]}},
}


def make_batch(cfg: ModelConfig, parallel: ParallelConfig, device):
    q = MultiScaleBSQ(dim=8, scales=[(1, 1), (2, 2), (3, 3), (4, 4)])
    latent = torch.randn(2, 8, 4, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    if cfg.condition.kind == "class":
        cond, text_len = torch.tensor([2, 7]), None
    else:
        cond = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(1)).to(device)
        text_len = torch.tensor([5, 2])  # the second caption is padded: its keys 2..4 are masked
    return build_batch(q, cfg, latent_BdTHW=latent, cond=cond, text_len_B=text_len, training=True,
                       generator=torch.Generator(device).manual_seed(1),
                       pad_to_multiple=sequence_multiple(parallel))


def forward_backward(model, batch, cfg, video_index_n=None, scope=contextlib.nullcontext):
    with scope():
        logits = model(batch)
        out = bit_loss(logits, batch.targets_BNd, batch.layout, cfg.loss, video_index_n=video_index_n)
        out.loss.backward()
    return out


def run_mode(ctx, mode: str) -> dict:
    cfg = build_dataclass(ModelConfig, {**BASE, **MODE_CONFIGS[mode]})
    parallel = ParallelConfig(tensor_parallel=TP, sequence_parallel=TP > 1, context_parallel=2,
                              context_parallel_chunk=3)
    batch = make_batch(cfg, parallel, ctx.device)

    groups = init_model_parallel(ctx, ParallelConfig())
    torch.manual_seed(0)
    ref = build_model(cfg, ParallelConfig(), groups, device=ctx.device)
    ref_out = forward_backward(ref, batch, cfg)
    ref_params = dict(ref.named_parameters())
    destroy_model_parallel(ctx)

    groups = init_model_parallel(ctx, parallel)
    torch.manual_seed(123)  # different init: the comparison must come from the copied weights
    model = build_model(cfg, parallel, groups, device=ctx.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard(name, p, ref_params[name].detach(), groups.tp.rank(), groups.tp.size()))
    index_n = model.video_index_n(batch.layout, ctx.device)
    scope = host_current_device if ctx.device.type == "cpu" else contextlib.nullcontext
    out = forward_backward(model, batch, cfg, index_n, scope)
    if TP > 1:
        allreduce_sequence_parallel_grads(model, groups.tp)

    sums = torch.stack([out.loss.detach(), out.bit_accuracy, *out.per_scale_loss_K]).double()
    dist.all_reduce(sums, group=groups.cp)
    want = torch.stack([ref_out.loss.detach(), ref_out.bit_accuracy, *ref_out.per_scale_loss_K]).double()
    grad_diff, worst = 0.0, ""
    for name, p in model.named_parameters():
        summed = p.grad.clone()
        dist.all_reduce(summed, group=groups.cp)
        full = unshard(name, p, summed, groups.tp)
        ref_grad = ref_params[name].grad
        diff = ((full - ref_grad).abs().max() / ref_grad.abs().max().clamp(min=1e-12)).item()
        if diff > grad_diff:
            grad_diff, worst = diff, name
    result = {"rank": ctx.rank, "mode": mode, "tp": groups.tp.size(), "cp": groups.cp.size(),
              "loss": sums[0].item(), "ref_loss": want[0].item(),
              "loss_rel_diff": abs(sums[0].item() / want[0].item() - 1),
              "metrics_max_diff": (sums - want).abs().max().item(),
              "grad_max_rel_diff": grad_diff, "worst_param": worst, "n_params": len(ref_params),
              "seq_len": batch.layout.seq_len, "local_video": int(index_n.numel()),
              "video_len": batch.layout.video_len}
    destroy_model_parallel(ctx)
    return result


def main():
    ctx = init_distributed(device=DEVICE)
    for mode in MODES:
        result = run_mode(ctx, mode)
        with open(f"{OUT}/{mode}_rank{ctx.rank}.json", "w") as f:
            json.dump(result, f)
    shutdown_distributed()


if __name__ == "__main__":
    main()
