"""Run under torchrun with 2 processes: sampling at TP=2 gives the TP=1 bits and logits.

Every rank loads the same checkpoint twice through ``load_sampler``: at TP=1 (two data-parallel
replicas) and at TP=2 (the checkpoint resharded on load), decodes the same samples with the same keys
(plain and continuing known frames, then videos through the tokenizer) and saves what it got to
``rank{r}.pt``. Usage: sample_tp.py OUT_DIR CKPT TOKENIZER_DIR
"""
import sys

import torch

from videoar_common.config import build_dataclass
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.sampling.bits import sample_key
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.extend import generate_videos
from videoar_megatron.sampling.loading import load_sampler
from videoar_megatron.sampling.sampler import Conditions

OUT, CKPT, TOKENIZER = sys.argv[1:4]


def decode(ctx, tp: int) -> dict:
    cfg = build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}, "top_p": 0.95, "tensor_parallel": tp,
                                           "device": "cpu"})
    loaded = load_sampler(CKPT, TOKENIZER, cfg, ctx)
    cond, keys = Conditions.labels([0, 2, 4]), torch.tensor([sample_key(3, i) for i in range(3)])
    out = loaded.sampler.generate(cond, keys, record_logits=True)
    cont = loaded.sampler.generate(cond, keys, known_bits_BTLd=out.bits_BTLd[:, :1], record_logits=True)
    videos = generate_videos(loaded.sampler, loaded.tokenizer, cond, [0, 1, 2], seed=3, frames=13)
    result = {"bits": out.bits_BTLd, "logits": out.logits_BTLd, "cont_bits": cont.bits_BTLd,
              "videos": videos, "tp_size": loaded.groups.tp.size()}
    loaded.close()
    return result


def main():
    ctx = init_distributed(device="cpu")
    result = {"tp1": decode(ctx, 1), "tp2": decode(ctx, 2)}
    torch.save(result, f"{OUT}/rank{ctx.rank}.pt")
    shutdown_distributed()


if __name__ == "__main__":
    main()
