"""Run under torchrun with 2 processes: a TP=2 VideoAR model equals the TP=1 model it was sharded from.

Every rank: build the TP=1 model, run forward/backward on a fixed batch; re-initialise Megatron with
TP=2 (optionally sequence parallel), shard the TP=1 weights into the TP=2 model, run the same batch;
compare loss, logits and gathered gradients. Writes ``rank{r}.json`` with the largest differences.

Usage: tp_parity.py OUT_DIR {plain|sp|sp_recompute} {cpu|cuda}

On a CPU-only host, sequence parallelism needs one redirection: Megatron's sequence-parallel linears
allocate their all-gather / reduce-scatter buffers with ``device=torch.cuda.current_device()``. The TP=2
forward/backward runs inside ``cuda_compat.host_current_device()`` (the library's scoped redirect, the
one the local engine uses); all computation and communication stay Megatron's.
Activation recompute saves CUDA RNG states, so ``sp_recompute`` runs on CUDA only.
"""
import contextlib
import json
import sys

import torch

from tests.tp_shards import allreduce_sequence_parallel_grads, shard, unshard
from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.model import build_model
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.model.sequence import build_batch
from videoar_megatron.training.cuda_compat import host_current_device

OUT, MODE, DEVICE = sys.argv[1], sys.argv[2], sys.argv[3]
SP = MODE.startswith("sp")
RECOMPUTE = "full" if MODE == "sp_recompute" else "none"


def run(model, batch, cfg, scope=contextlib.nullcontext):
    with scope():
        logits = model(batch)
        out = bit_loss(logits, batch.targets_BNd, batch.layout, cfg.loss)
        out.loss.backward()
    return out.loss.detach(), logits.detach()


def main():
    ctx = init_distributed(device=DEVICE)
    sp_buffers = host_current_device if SP and ctx.device.type == "cpu" else contextlib.nullcontext
    raw = {"size": "custom", "num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "latent_dim": 8,
           "condition": {"kind": "class", "num_classes": 10, "tokens_per_class": 3},
           "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}}
    if SP:
        raw["num_query_groups"] = 2  # grouped-query attention too
    cfg = build_dataclass(ModelConfig, raw)
    q = MultiScaleBSQ(dim=8, scales=[(1, 1), (2, 2), (3, 3), (4, 4)])
    latent = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(ctx.device)
    # 3 prefix + 3 x 30 video tokens = 93 (odd): sequence parallel pads it to 94.
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([2, 7]), training=True,
                        generator=torch.Generator(ctx.device).manual_seed(1), pad_to_multiple=2 if SP else 1)

    groups = init_model_parallel(ctx, ParallelConfig(tensor_parallel=1))
    torch.manual_seed(0)
    ref = build_model(cfg, ParallelConfig(tensor_parallel=1), groups, device=ctx.device)
    ref_loss, ref_logits = run(ref, batch, cfg)
    ref_params = dict(ref.named_parameters())
    destroy_model_parallel(ctx)

    parallel = ParallelConfig(tensor_parallel=2, sequence_parallel=SP, recompute=RECOMPUTE)
    groups = init_model_parallel(ctx, parallel)
    tp_rank, tp = groups.tp.rank(), groups.tp.size()
    torch.manual_seed(123)  # different init: the comparison must come from the copied weights
    model = build_model(cfg, parallel, groups, device=ctx.device)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(shard(name, p, ref_params[name].detach(), tp_rank, tp))
    loss, logits = run(model, batch, cfg, sp_buffers)
    if SP:
        allreduce_sequence_parallel_grads(model, groups.tp)

    grad_diff, worst = 0.0, ""
    for name, p in model.named_parameters():
        full = unshard(name, p, p.grad, groups.tp)
        want = ref_params[name].grad
        diff = ((full - want).abs().max() / want.abs().max().clamp(min=1e-12)).item()
        if diff > grad_diff:
            grad_diff, worst = diff, name
    result = {"rank": ctx.rank, "mode": MODE, "device": DEVICE, "loss": loss.item(), "ref_loss": ref_loss.item(),
              "logits_max_diff": (logits - ref_logits).abs().max().item(),
              "grad_max_rel_diff": grad_diff, "worst_param": worst,
              "n_params": len(ref_params), "seq_len": batch.layout.seq_len}
    with open(f"{OUT}/rank{ctx.rank}.json", "w") as f:
        json.dump(result, f)
    destroy_model_parallel(ctx)
    shutdown_distributed()


if __name__ == "__main__":
    main()
