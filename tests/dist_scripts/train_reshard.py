"""Run under torchrun: a checkpoint written at one TP size continues at another (library API, no CLI).

Usage: train_reshard.py {save|load} RUN_DIR SHARDS OUT_JSON TP {local|megatron}

- ``save``: build the tiny trainer at TP, train 6 steps, save step 6, write the TP-gathered weights, then
  train 2 more steps and record their losses.
- ``load``: build the trainer at TP over a copy of that run directory holding only step 6, restore
  (resharding weights and optimizer state), write the gathered weights, train 2 steps, record losses.
Rank 0 writes OUT_JSON (losses, layout, engine) and OUT_JSON with suffix .pt (weights). ``megatron``
builds the production engine (``train.engine=megatron``) inside ``cuda_compat.emulated_cuda``.
"""
import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tests.train_helpers import TINY_RECIPE
from videoar_common.config import load_config
from videoar_megatron.training.config import TrainConfig
from videoar_megatron.training.cuda_compat import emulated_cuda
from videoar_megatron.training.trainer import build_trainer


def gathered(model, groups) -> dict:
    """Full (TP=1 layout) weights from every TP rank's shard."""
    full = {}
    for name, p in model.named_parameters():
        parts = [torch.empty_like(p) for _ in range(groups.tp.size())]
        dist.all_gather(parts, p.detach().contiguous(), group=groups.tp)
        if not getattr(p, "tensor_model_parallel", False):
            full[name] = parts[0]
            continue
        if name.endswith("mlp.linear_fc1.weight"):  # per rank [gate_r; up_r] → [gates; ups]
            gates, ups = zip(*(part.chunk(2, dim=0) for part in parts))
            parts = list(gates) + list(ups)
        full[name] = torch.cat(parts, dim=p.partition_dim)
    return full


def main() -> None:
    mode, run_dir, shards, out, tp = sys.argv[1], Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), int(sys.argv[5])
    engine = sys.argv[6]
    cfg = load_config(TrainConfig, TINY_RECIPE, [f"data.path={shards}", f"parallel.tensor_parallel={tp}",
                                                 "train.steps=8", "optim.warmup_steps=2", "checkpoint.save_every=0",
                                                 "logging.progress_bar=false", "checkpoint.keep_last=0",
                                                 f"train.engine={engine}"])
    with emulated_cuda() if engine == "megatron" else contextlib.nullcontext():
        run(mode, cfg, run_dir, out)


def run(mode: str, cfg: TrainConfig, run_dir: Path, out: Path) -> None:
    trainer = build_trainer(cfg, run_dir)
    try:
        what = trainer.restore()
        if mode == "save":
            for _ in range(6):
                trainer.train_step()
            trainer.save()
            trainer.wait_for_saves()  # committed (checkpoint.async_save writes in the background)
        weights = gathered(trainer.model, trainer.groups)
        records = [trainer.train_step() for _ in range(2)]
        losses = [r["loss"] for r in records]
        norms = [r["grad_norm"] for r in records]
        if trainer.ctx.is_main:
            torch.save(weights, out.with_suffix(".pt"))
            out.write_text(json.dumps({"losses": losses, "grad_norms": norms, "restored": what, "step": trainer.step,
                                       "tp": trainer.layout.tp, "dp": trainer.layout.dp,
                                       "engine": trainer.engine_name}))
    finally:
        trainer.close()


if __name__ == "__main__":
    main()
