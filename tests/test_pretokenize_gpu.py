"""GPU pre-tokenization (run on a GPU host: `make test-gpu`): NVDEC accepts what DALI CPU rejects, frames
stay on the GPU, the bf16 pipeline equals a direct bf16 encode of the same clips and is close to the
fp32 CPU path, and a rerun is byte-identical."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

import pytest
import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.pretokenize.encoder import ClipEncoder, EncoderGraph
from data_prep.video import ClipPlan, DaliClipDecoder, frames_to_model_input, plan_clips, probe_video
from tests.frame_checks import assert_same_frames
from tests.pretok_helpers import (CLIP, GPU_SIZE, SCHEDULE, make_clean_corpus, make_mixed_corpus,
                                  make_tiny_tokenizer, pretok_config, pretokenizer, tree_bytes)
from tests.test_pretokenize import read_all
from tests.test_transcode_ucf101 import write_mpeg4_avi
from tokenizer import load_tokenizer

pytestmark = pytest.mark.gpu


def gpu_config(tok, manifest, out, **kw):
    return pretok_config(tok, manifest, out, device="cuda", decode_device="gpu", **kw)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


def test_nvdec_frames_stay_on_the_gpu(tmp_path):
    records = read_manifest(make_clean_corpus(tmp_path, num=2, size=GPU_SIZE))
    plans = [ClipPlan(path=r.path, start_frame=1, stride=2, num_frames=5) for r in records]
    gpu = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=2).decode(plans)
    cpu = DaliClipDecoder(height=32, width=32, device="cpu", batch_size=2).decode(plans)
    for g, c in zip(gpu, cpu):
        assert g.is_cuda and g.dtype == torch.uint8 and g.shape == (5, 32, 32, 3)
        assert_same_frames(g, c, tol=6.0)  # same frames (not a neighbour); NVDEC colour conversion differs a bit


def test_nvdec_frames_do_not_depend_on_the_pipeline_count(tmp_path):
    records = read_manifest(make_clean_corpus(tmp_path, num=3, size=GPU_SIZE))
    plans = [ClipPlan(path=r.path, start_frame=s, stride=st, num_frames=5)
             for r in records for s, st in ((0, 1), (2, 2))]
    reference = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=4).decode(plans)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # pool threads must copy on the caller's stream, as one pipeline does
        got = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=4, pipelines=3).decode(plans)
    side.synchronize()
    assert len(got) == len(reference) == 6
    for g, r in zip(got, reference):
        assert g.is_cuda and torch.equal(g, r)


def test_gpu_accepts_h264_and_mpeg4_and_still_rejects_the_broken(tok, tmp_path):
    manifest, expected = make_mixed_corpus(tmp_path / "mixed", size=GPU_SIZE)
    write_mpeg4_avi(tmp_path / "mixed" / "ucf" / "v_x.avi", label=1, seed=5, size=GPU_SIZE)
    with open(manifest, "a") as f:
        f.write("ucf/v_x.avi,a mpeg4 part 2 clip,1\n")
    out = tmp_path / "shards"
    pretokenizer(gpu_config(tok, manifest, out)).run()
    rejected = {r["source"]: r for r in shards.read_rejects(out / "rejects.jsonl")}
    assert set(rejected) == {s for s, kind in expected.items() if kind != "codec"}  # h264 now decodes
    sources = {s["source"] for s in read_all(out)}
    assert "ucf/v_x.avi" in sources and any(s.endswith(".mp4") for s in sources)
    m = shards.read_shard_manifest(out)
    assert (m["decode_device"], m["encode_dtype"]) == ("gpu", "bfloat16")


def test_gpu_pipeline_equals_direct_bf16_encode_and_is_close_to_cpu_fp32(tok, tmp_path):
    corpus = make_clean_corpus(tmp_path / "corpus", num=4, size=GPU_SIZE)
    gpu_out, cpu_out = tmp_path / "gpu", tmp_path / "cpu"
    pretokenizer(gpu_config(tok, corpus, gpu_out, num_partitions=1)).run()
    pretokenizer(pretok_config(tok, corpus, cpu_out, num_partitions=1)).run()
    got = read_all(gpu_out)
    # direct: same clips, same batches (the last zero-padded), DALI GPU decode, bf16 autocast encode, NCDHW
    model = load_tokenizer(tok, device="cuda")
    clips_cfg = pretok_config(tok, corpus, tmp_path / "x").clips
    jobs = [p for r in read_manifest(corpus) for p in plan_clips(probe_video(r.path, "gpu"), clips_cfg)]
    decoder = DaliClipDecoder(height=CLIP["height"], width=CLIP["width"], device="gpu", batch_size=3)
    direct = []
    for k in range(0, len(jobs), 3):
        frames = decoder.decode(jobs[k:k + 3])
        padded = frames + [torch.zeros_like(frames[0])] * (3 - len(frames))  # as the graphed encoder pads
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            latent = model.encode(torch.stack([frames_to_model_input(f) for f in padded]))
        direct += list(latent[:len(frames)].permute(0, 2, 1, 3, 4).float().cpu())
    assert len(got) == len(direct) == 8
    for g, d in zip(got, direct):
        assert torch.equal(g["latent"], d)  # float32 storage of the bf16 encoder output
    for g, c in zip(got, read_all(cpu_out)):
        rel = (g["latent"] - c["latent"]).norm() / c["latent"].norm()
        assert rel < 0.05, rel  # NVDEC vs CPU frames, bf16 vs fp32 encoder
        assert (g["bits"] == c["bits"]).float().mean() > 0.9
    q = load_tokenizer(tok).quantizer_for(SCHEDULE)
    for g in got:
        t, d, h, w = g["latent"].shape
        assert torch.equal(q.flatten_bits(q.latent_to_bits(g["latent"])).reshape(t, -1, d), g["bits"])


def test_gpu_channels_last_encoder_is_close_to_contiguous(tok, tmp_path):
    corpus = make_clean_corpus(tmp_path / "corpus", num=4, size=GPU_SIZE)
    runs = {}
    for layout in ("channels_last", "contiguous"):
        out = tmp_path / layout
        pretokenizer(gpu_config(tok, corpus, out, encoder_memory_format=layout)).run()
        runs[layout] = read_all(out)
    assert len(runs["channels_last"]) == len(runs["contiguous"]) == 8
    for a, b in zip(runs["channels_last"], runs["contiguous"]):
        rel = (a["latent"] - b["latent"]).norm() / b["latent"].norm()
        assert rel < 0.02, rel  # other cuDNN kernels, bf16 rounding
        assert (a["bits"] == b["bits"]).float().mean() > 0.95


@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_graphed_encoder_equals_eager_on_full_and_padded_batches(tok, tmp_path, memory_format, monkeypatch):
    """encoder_cuda_graph: every batch replays the captured graph; its latents and bits equal the eager
    encoder's on the same batch bit for bit, a partial batch being zero-padded to the captured size."""
    cfg = gpu_config(tok, tmp_path / "m.csv", tmp_path / "o", batch_size=4, encoder_memory_format=memory_format)
    cuda = torch.device("cuda")
    graphed = ClipEncoder(cfg, load_tokenizer(tok, cuda), cuda)
    eager = ClipEncoder(dataclasses.replace(cfg, encoder_cuda_graph=False), load_tokenizer(tok, cuda), cuda)
    assert graphed.graph is not None and eager.graph is None
    gen = torch.Generator("cuda").manual_seed(0)
    frames = [torch.randint(0, 256, (CLIP["num_frames"], CLIP["height"], CLIP["width"], 3), generator=gen,
                            device="cuda", dtype=torch.uint8) for _ in range(4)]
    replays = []
    replay = EncoderGraph.__call__
    monkeypatch.setattr(EncoderGraph, "__call__", lambda self, x: (replays.append(len(x)), replay(self, x))[1])
    for batch in (frames, frames[:3], frames[::-1]):
        padded = batch + [torch.zeros_like(frames[0])] * (4 - len(batch))
        a, b = graphed.encode(batch, ["x"] * len(batch)), eager.encode(padded, ["x"] * 4)
        assert len(a.latents) == len(batch)
        for x, y in zip(a.latents + a.bits, b.latents[:len(batch)] + b.bits[:len(batch)]):
            assert np.array_equal(x, y)
    assert replays == [4, 3, 4]


def test_gpu_rerun_is_byte_identical(tok, tmp_path):
    corpus = make_clean_corpus(tmp_path / "corpus", num=4, size=GPU_SIZE)
    a, b = tmp_path / "a", tmp_path / "b"
    pretokenizer(gpu_config(tok, corpus, a, latent_dtype="bfloat16")).run()
    pretokenizer(gpu_config(tok, corpus, b, latent_dtype="bfloat16")).run()
    assert tree_bytes(a) == tree_bytes(b)


def test_benchmark_smoke_on_gpu(tmp_path):
    from benchmarks.bench_pretokenize import main
    out = tmp_path / "bench.json"
    assert main(["--preset", "17x128", "--clips", "64", "--batch-size", "16", "--base-channels", "16",
                 "--res-blocks", "1", "--latent-dim", "16", "--encoder-iters", "2", "--decode-pipelines", "1,2",
                 "--encoder-memory-format", "both", "--full", "each", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert r["speedup_dali_vs_pyav"] > 0 and set(r["decode_only_clips_per_s"]) == {"1", "2"}
    assert set(r["encoder_only_by_memory_format"]) == {"contiguous", "channels_last"}
    assert all(b["clips"] == 64 and b["rejects"] == 0 for b in r["dali_full_by_pipelines"].values())
