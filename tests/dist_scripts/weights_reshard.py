"""Model weights saved at one TP size load at another with equal values.

argv: mode (save|load) out_dir tp. `save` writes a checkpoint and the TP-gathered full weights;
`load` builds the model at `tp`, loads the checkpoint and writes its (gathered) weights."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.model import build_model
from videoar_megatron.model.parallel import init_model_parallel
from videoar_megatron.training.dist_ckpt import load_model_weights, model_sharded_state_dict, save_checkpoint


def gathered(model, groups) -> dict:
    full = {}
    for name, p in model.named_parameters():
        parts = [torch.empty_like(p) for _ in range(groups.tp.size())]
        dist.all_gather(parts, p.detach().contiguous(), group=groups.tp)
        dim = p.partition_dim if getattr(p, "tensor_model_parallel", False) else -1
        if "linear_fc1" in name:
            # SwiGLU: each TP shard holds [gate_r; up_r]; the unsharded layout is [gates; ups].
            halves = [part.chunk(2, dim=0) for part in parts]
            parts = [h[0] for h in halves] + [h[1] for h in halves]
        full[name] = torch.cat(parts, dim=dim) if dim >= 0 else parts[0]
    return full


mode, out, tp = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
ctx = init_distributed(device="cpu")
parallel = ParallelConfig(tensor_parallel=tp)
groups = init_model_parallel(ctx, parallel)
model = build_model(ModelConfig(size="tiny", latent_dim=8), parallel, groups)
if mode == "save":
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.normal_(generator=torch.Generator().manual_seed(1000 * i + ctx.rank))
    save_checkpoint(out / "ckpt", 7, model_sharded_state_dict(model, ctx), {"step": 7}, ctx)
else:
    train_state = load_model_weights(out / "ckpt" / "step_00000007", model, ctx)
    assert train_state["step"] == 7
weights = gathered(model, groups)
if ctx.rank == 0:
    torch.save(weights, out / f"{mode}_tp{tp}.pt")
shutdown_distributed()
