"""Run under torchrun with 2 GPUs: PP=2 through Megatron's 1F1B schedule equals PP=1.

Every rank: build the whole model (PP=1, on its GPU), run 2 microbatches forward/backward (loss / 2
each, as the schedule averages); then PP=2: build this rank's stage, copy the matching layers, run
the same microbatches through ``get_forward_backward_func()``; compare the last stage's losses and
every stage's gradients. Writes ``rank{r}.json``.

Usage: pp_parity.py OUT_DIR
"""
import json
import sys

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.model import build_model
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.model.sequence import build_batch

OUT = sys.argv[1]
MICROBATCHES = 2


def batches(cfg, device):
    q = MultiScaleBSQ(dim=8, scales=[(1, 1), (2, 2), (3, 3), (4, 4)])
    out = []
    for seed in range(MICROBATCHES):
        latent = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(seed)).to(device)
        out.append(build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([seed, 5]), training=True,
                               generator=torch.Generator(device).manual_seed(10 + seed)))
    return out


def stage_name(name: str, offset: int) -> str:
    """Local parameter name → the whole model's name (layers are numbered per stage)."""
    if not name.startswith("decoder.layers."):
        return name
    i, rest = name[len("decoder.layers."):].split(".", 1)
    return f"decoder.layers.{int(i) + offset}.{rest}"


def main():
    ctx = init_distributed(device="cuda")
    cfg = build_dataclass(ModelConfig, {"size": "custom", "num_layers": 4, "hidden_size": 64,
                                        "num_attention_heads": 4, "latent_dim": 8,
                                        "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}})
    data = batches(cfg, ctx.device)

    groups = init_model_parallel(ctx, ParallelConfig())
    torch.manual_seed(0)
    ref = build_model(cfg, ParallelConfig(), groups, device=ctx.device)
    ref_losses = []
    for mb in data:
        loss = bit_loss(ref(mb), mb.targets_BNd, mb.layout, cfg.loss).loss
        (loss / MICROBATCHES).backward()
        ref_losses.append(loss.item())
    ref_params = dict(ref.named_parameters())
    destroy_model_parallel(ctx)

    parallel = ParallelConfig(pipeline_parallel=2)
    groups = init_model_parallel(ctx, parallel)
    pp_rank = groups.pp.rank()
    model = build_model(cfg, parallel, groups, device=ctx.device)
    offset = pp_rank * (cfg.num_layers // 2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(ref_params[stage_name(name, offset)])

    def forward_step(data_iterator, stage):
        mb = next(data_iterator)

        def loss_func(logits):
            loss = bit_loss(logits, mb.targets_BNd, mb.layout, cfg.loss).loss
            # Megatron divides the returned loss by num_microbatches in place: hand it a copy so the
            # logged value stays the per-microbatch loss (the trainer does the same).
            return loss.clone(), {"loss": loss.detach()}
        return stage(mb), loss_func

    out = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(data), model=[model],
                                      num_microbatches=MICROBATCHES, seq_length=data[0].layout.seq_len,
                                      micro_batch_size=2, forward_only=False)
    losses = [d["loss"].item() for d in out] if model.post_process else []
    grad_diff = max(((p.grad - ref_params[stage_name(n, offset)].grad).abs().max()
                     / ref_params[stage_name(n, offset)].grad.abs().max().clamp(min=1e-12)).item()
                    for n, p in model.named_parameters())
    result = {"rank": ctx.rank, "pp_rank": pp_rank, "losses": losses, "ref_losses": ref_losses,
              "grad_max_rel_diff": grad_diff, "n_params": sum(1 for _ in model.parameters())}
    with open(f"{OUT}/rank{ctx.rank}.json", "w") as f:
        json.dump(result, f)
    destroy_model_parallel(ctx)
    shutdown_distributed()


if __name__ == "__main__":
    main()
