"""GPU path of tokenizer training (run on a GPU host with `make test-gpu`): bf16 engines with fp32
masters inside ZeRO, NVDEC decoding, a NaN drill under bf16, and an fp32 export that equals the masters
DeepSpeed's zero_to_fp32 gathers from the checkpoint (and rounds to the engine's bf16 weights)."""
from __future__ import annotations

import json

import pytest
import torch

from data_prep.synth import make_corpus
from tests.test_tokenizer_train import assert_export_is_the_final_masters, losses, torchrun, write_recipe
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
    # the export is the fp32 masters (gathered from ZeRO), not the bf16 weights the engine computes with
    assert_export_is_the_final_masters(run, final=6, earlier=3)
    from tokenizer.checkpoint import load_tokenizer
    exported = load_tokenizer(run / "tokenizer").state_dict()
    module = torch.load(run / "checkpoints" / "step_00000006" / "autoencoder" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=False)["module"]
    module = {k.removeprefix("tokenizer."): v for k, v in module.items()}
    weights = [k for k, v in module.items() if v.dtype == torch.bfloat16]
    assert weights and set(weights) <= set(exported)
    for key in weights:  # the engine's bf16 weights are its fp32 masters rounded
        assert torch.equal(exported[key].bfloat16(), module[key]), key
    assert any(not torch.equal(exported[k], module[k].float()) for k in weights)  # more than bf16 precision
