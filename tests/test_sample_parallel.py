"""Parallel sampling on gloo (2 processes): TP=2 (checkpoint resharded on load) samples the TP=1 bits;
``videoar sample`` under torchrun (data parallel or TP=2) writes the files of a single process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sample_helpers import model_config, write_ar_checkpoint, write_tokenizer
from videoar_common.distributed import init_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel

from videoar_megatron.cli import main as videoar

SCRIPTS = Path(__file__).parent / "dist_scripts"
ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "videoar_megatron" / "cli" / "__main__.py"
TINY = ROOT / "recipes" / "sample" / "tiny.yaml"


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


@pytest.mark.parametrize("tp", [1, 2])
def test_videoar_sample_under_torchrun_writes_the_single_process_files(torchrun, tmp_path, tp):
    """2 ranks (data parallel, or one TP=2 model) write the same videos and index as one process."""
    digest = write_tokenizer(tmp_path / "tokenizer")
    ctx = init_distributed(device="cpu")
    groups = init_model_parallel(ctx, ParallelConfig())
    write_ar_checkpoint(tmp_path / "run", 1, model_config(), digest, ctx, groups)
    destroy_model_parallel(ctx)
    args = ["sample", "--ckpt", str(tmp_path / "run"), "--tokenizer", str(tmp_path / "tokenizer"),
            "--recipe", str(TINY), "--class", "0,2,4", "--set", "batch_size=1"]
    assert videoar([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(CLI, 2, *args, "--out", str(tmp_path / "two"), "--set", f"tensor_parallel={tp}")
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["samples"] == two["samples"] and len(one["samples"]) == 3
    for s in one["samples"]:
        assert (tmp_path / "one" / s["file"]).read_bytes() == (tmp_path / "two" / s["file"]).read_bytes()
