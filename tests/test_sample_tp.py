"""Tensor-parallel sampling: TP=2 (checkpoint resharded on load) samples the TP=1 bits (2 processes, gloo)."""
from __future__ import annotations

from pathlib import Path

import torch

from sample_helpers import model_config, write_ar_checkpoint, write_tokenizer
from videoar_megatron.common.distributed import init_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel

SCRIPTS = Path(__file__).parent / "dist_scripts"


def test_tp2_sampling_equals_tp1_on_gloo(torchrun, tmp_path):
    digest = write_tokenizer(tmp_path / "tokenizer")
    ctx = init_distributed(device="cpu")
    groups = init_model_parallel(ctx, ParallelConfig())
    write_ar_checkpoint(tmp_path / "run", 1, model_config(num_query_groups=2), digest, ctx, groups)
    destroy_model_parallel(ctx)
    torchrun(SCRIPTS / "sample_tp.py", 2, tmp_path, tmp_path / "run", tmp_path / "tokenizer")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ref = ranks[0]["tp1"]
    assert ranks[0]["tp2"]["tp_size"] == 2 and ref["tp_size"] == 1
    for r in ranks:
        for tp in ("tp1", "tp2"):
            assert torch.equal(r[tp]["bits"], ref["bits"]), tp
            assert torch.equal(r[tp]["cont_bits"], ref["bits"]), tp
            torch.testing.assert_close(r[tp]["logits"], ref["logits"], atol=1e-4, rtol=1e-4)
            assert r[tp]["videos"].shape == (3, 3, 13, 64, 64)
            torch.testing.assert_close(r[tp]["videos"], ref["videos"], atol=1e-4, rtol=0)
