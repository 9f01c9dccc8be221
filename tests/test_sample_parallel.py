"""Parallel sampling on gloo (2 processes) of a real tiny training run's checkpoint: TP=2 (resharded on
load) samples the TP=1 bits; ``videoar sample`` under torchrun (data parallel or TP=2) writes the files
of a single process."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from videoar_megatron.cli import main as videoar

SCRIPTS = Path(__file__).parent / "dist_scripts"
ROOT = Path(__file__).resolve().parents[1]
CLI = ROOT / "videoar_megatron" / "cli" / "__main__.py"
TINY = ROOT / "recipes" / "sample" / "tiny.yaml"


def test_tp2_sampling_equals_tp1_on_gloo(torchrun, tmp_path, trained_ar_run):
    """The trained run has 2 query groups for 4 heads: TP=2 splits them."""
    torchrun(SCRIPTS / "sample_tp.py", 2, tmp_path, trained_ar_run / "checkpoints", trained_ar_run.parent / "tokenizer")
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
def test_videoar_sample_under_torchrun_writes_the_single_process_files(torchrun, tmp_path, tp, trained_ar_run):
    """2 ranks (data parallel, or one TP=2 model) write the same videos and index as one process."""
    args = ["sample", "--ckpt", str(trained_ar_run), "--tokenizer", str(trained_ar_run.parent / "tokenizer"),
            "--recipe", str(TINY), "--class", "0,2,4", "--set", "batch_size=1"]
    assert videoar([*args, "--out", str(tmp_path / "one")]) == 0
    torchrun(CLI, 2, *args, "--out", str(tmp_path / "two"), "--set", f"tensor_parallel={tp}")
    one, two = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "two"))
    assert two["world_size"] == 2 and one["samples"] == two["samples"] and len(one["samples"]) == 3
    for s in one["samples"]:
        assert (tmp_path / "one" / s["file"]).read_bytes() == (tmp_path / "two" / s["file"]).read_bytes()
