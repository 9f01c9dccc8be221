"""GPU path of tokenizer training (run on a GPU host with `make test-gpu`): bf16 engines with fp32
masters inside ZeRO, NVDEC decoding, a NaN drill under bf16, and an fp32 export gathered from ZeRO."""
from __future__ import annotations

import json

import pytest
import torch

from data_prep.synth import make_corpus
from tests.test_tokenizer_train import losses, torchrun, write_recipe
from videoar_common.atomic import committed_steps

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def nvdec_corpus(tmp_path_factory):
    """VP9 at 128x128: NVDEC's smallest VP9 frame (it rejects the 16x16 CPU-test corpus as too small);
    the recipe still resizes to 16x16 clips."""
    root = tmp_path_factory.mktemp("nvdec_corpus")
    make_corpus(root / "train", num=8, classes=4, frames=9, size=(128, 128), seed=0)
    make_corpus(root / "eval", num=2, classes=2, frames=9, size=(128, 128), seed=1)
    (root / "train" / "train_with_bad.csv").write_text((root / "train" / "metadata.csv").read_text())
    return root


def test_bf16_training_on_gpu_skips_nan_and_exports_fp32(tmp_path, nvdec_corpus):
    corpus = nvdec_corpus
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
