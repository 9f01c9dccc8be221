"""GPU path of tokenizer training (run on a GPU host with `make test-gpu`): bf16 engines with fp32
masters inside ZeRO, NVDEC decoding, a NaN drill under bf16, and an fp32 export gathered from ZeRO."""
from __future__ import annotations

import json

import pytest
import torch

from tests.test_tokenizer_train import corpus, losses, torchrun, write_recipe  # noqa: F401 (fixture)
from videoar_megatron.common.atomic import committed_steps

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_bf16_training_on_gpu_skips_nan_and_exports_fp32(tmp_path, corpus):
    recipe = write_recipe(tmp_path / "gpu.yaml", corpus, device="cuda", deepspeed__precision="bf16",
                          data__decode_device="gpu", steps=6, checkpoint__every=3,
                          numerics__inject_nonfinite_step=2, numerics__inject_nonfinite_rank=0)
    run = tmp_path / "run"
    torchrun(run, recipe, nproc=1)
    recs = losses(run)
    assert sorted(recs) == list(range(1, 7))
    assert all(torch.isfinite(torch.tensor(r["g_total"])) for r in recs.values())
    assert recs[6]["rec"] < recs[1]["rec"]
    events = [json.loads(line) for line in (run / "nonfinite.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events] == [2]
    assert committed_steps(run / "checkpoints") == [3, 6]
    from tokenizer.checkpoint import load_tokenizer
    model = load_tokenizer(run / "tokenizer")
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
