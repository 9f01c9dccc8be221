"""GPU pre-tokenization (run on a GPU host: `make test-gpu`, or benchmarks/gpu/pretokenize_session.sh):
NVDEC accepts what DALI CPU rejects, frames stay on the GPU, the bf16 pipeline equals a direct bf16
encode of the same clips and is close to the fp32 CPU path, a rerun is byte-identical, variable-rate
videos are cut by time on NVDEC too, the shards do not depend on the NVDEC pipeline count or stream
priority nor on a decode process, CPU decoders feed a GPU encoder, and the encoder's micro-batches and
compile behave (compiled latents judged against fp32, not against eager)."""
from __future__ import annotations

import dataclasses
import json

import numpy as np

import pytest
import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.pretokenize.encoder import ClipEncoder, EncoderGraph
from data_prep.video import (ClipPlan, ClipSamplingConfig, DaliClipDecoder, frames_to_model_input, plan_clips,
                             probe_video)
from tests.frame_checks import assert_same_frames
from tests.pretok_helpers import (CLIP, COMPILED_FACTOR, GPU_SIZE, SCHEDULE, make_clean_corpus, make_mixed_corpus,
                                  make_tiny_tokenizer, pretok_config, pretokenizer, relative_distance, tree_bytes)
from tests.test_pretokenize import read_all
from tests.test_pretokenize_timing import frame_ids, irregular_times, write_timed_video
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


@pytest.mark.parametrize("priority", [0, -5])
def test_nvdec_frames_do_not_depend_on_the_pipeline_count_or_stream_priority(tmp_path, priority):
    records = read_manifest(make_clean_corpus(tmp_path, num=3, size=GPU_SIZE))
    plans = [ClipPlan(path=r.path, start_frame=s, stride=st, num_frames=5)
             for r in records for s, st in ((0, 1), (2, 2))]
    reference = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=4).decode(plans)
    side = torch.cuda.Stream(priority=priority)
    with torch.cuda.stream(side):  # pool threads must copy on the caller's stream, as one pipeline does
        got = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=4, pipelines=3,
                              stream_priority=priority).decode(plans)
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


def test_variable_rate_clips_are_cut_by_time_on_nvdec_too(tmp_path):
    """The CPU test's irregular-gap video, decoded by NVDEC: every frame within half a target period of
    its target time, by the timestamps the test wrote."""
    times = irregular_times(60, 20, 120, seed=1)
    path = write_timed_video(tmp_path / "vfr.webm", times, size=GPU_SIZE)
    cfg = ClipSamplingConfig(num_frames=17, target_fps=8.0, clips_per_video=3, height=32, width=32)
    plans = plan_clips(probe_video(path, "gpu"), cfg)
    assert len(plans) == 3 and all(p.stride == 0 for p in plans)
    for plan, frames in zip(plans, DaliClipDecoder(height=32, width=32, device="gpu", batch_size=3).decode(plans)):
        ids = frame_ids(frames.cpu())
        assert ids[0] == plan.start_frame
        for k, i in enumerate(ids):
            assert abs(times[i] - (times[ids[0]] + 125 * k)) <= 62.5, (k, i)


def test_shards_do_not_depend_on_the_nvdec_pipeline_count(tok, tmp_path):
    """NVDEC pipelines pull from one queue; which took a clip does not change a byte."""
    corpus = make_clean_corpus(tmp_path / "corpus", num=5, size=GPU_SIZE)
    runs = {}
    for n in (1, 3):
        out = tmp_path / f"p{n}"
        pretokenizer(gpu_config(tok, corpus, out, decode_pipelines=n, latent_dtype="bfloat16")).run()
        runs[n] = tree_bytes(out)
        log = json.loads(next((out / shards.LOG_DIR).glob("part-*.json")).read_text())
        assert set(log["clips_by_decoder"]) <= {f"nvdec-{i}" for i in range(n)}
    assert runs[1] == runs[3]


def test_nvdec_and_cpu_decoders_give_different_pixels_so_they_are_never_mixed(tmp_path):
    """Why pyav_decoders refuses NVDEC: DALI's CUDA colour conversion (nearest luma, bilinear chroma,
    BT.601 in float) and libswscale's differ. If this ever fails (equal frames), the two could be mixed:
    lift NVDEC_WITH_CPU_DECODERS and test NVDEC + PyAV byte-identical shards instead."""
    records = read_manifest(make_clean_corpus(tmp_path, num=2, size=GPU_SIZE))
    plans = [ClipPlan(path=r.path, start_frame=1, stride=2, num_frames=5) for r in records]
    gpu = DaliClipDecoder(height=32, width=32, device="gpu", batch_size=2).decode(plans)
    cpu = DaliClipDecoder(height=32, width=32, device="cpu", batch_size=2).decode(plans)
    diffs = [(g.cpu().int() - c.int()).abs() for g, c in zip(gpu, cpu)]
    print("NVDEC vs CPU pixels: max", max(int(d.max()) for d in diffs),
          "mean", sum(float(d.float().mean()) for d in diffs) / len(diffs))
    assert any(int(d.max()) > 0 for d in diffs)


def test_cpu_decoders_feed_the_gpu_encoder_with_the_shards_of_dali_cpu(tok, tmp_path):
    """decode_device auto with PyAV decoders on a CUDA host decodes on the CPU; the shards equal a DALI
    CPU run's into the same bf16 GPU encoder, whichever CPU decoder took each clip."""
    corpus = make_clean_corpus(tmp_path / "corpus", num=4, size=GPU_SIZE)
    mixed, dali = tmp_path / "mixed", tmp_path / "dali"
    pretok = pretokenizer(pretok_config(tok, corpus, mixed, device="cuda", decode_device="auto", pyav_decoders=2,
                                        latent_dtype="bfloat16"))
    assert pretok.decode_device == "cpu"
    pretok.run()
    pretokenizer(pretok_config(tok, corpus, dali, device="cuda", decode_device="cpu", latent_dtype="bfloat16")).run()
    assert {k: v for k, v in tree_bytes(mixed).items() if k != "manifest.json"} == \
        {k: v for k, v in tree_bytes(dali).items() if k != "manifest.json"}


def test_micro_batched_encoder_equals_the_encoder_of_each_micro_batch(tok, tmp_path):
    """encoder_micro_batch=2 on batches of 5: graph replays of 2, 2 and 1 (zero-padded) clips, one at a
    time; the latents and bits equal an eager encoder run on each micro-batch padded alike. auto (0) is 4
    with NVDEC decode and the whole batch with host decode."""
    cuda = torch.device("cuda")
    cfg = gpu_config(tok, tmp_path / "m.csv", tmp_path / "o", batch_size=5, encoder_micro_batch=2)
    micro = ClipEncoder(cfg, load_tokenizer(tok, cuda), cuda)
    eager = ClipEncoder(dataclasses.replace(cfg, batch_size=2, encoder_cuda_graph=False), load_tokenizer(tok, cuda),
                        cuda)
    assert micro.micro_batch == 2 and micro.graph.input.shape[0] == 2
    gen = torch.Generator("cuda").manual_seed(2)
    frames = [torch.randint(0, 256, (CLIP["num_frames"], CLIP["height"], CLIP["width"], 3), generator=gen,
                            device="cuda", dtype=torch.uint8) for _ in range(5)]
    got = micro.encode(frames, ["x"] * 5)
    pad = torch.zeros_like(frames[0])
    want = [eager.encode(chunk, ["x"] * 2) for chunk in (frames[0:2], frames[2:4], [frames[4], pad])]
    want_latents = [x for w in want for x in w.latents][:5]
    want_bits = [x for w in want for x in w.bits][:5]
    for x, y in zip(got.latents + got.bits, want_latents + want_bits):
        assert np.array_equal(x, y)
    auto = ClipEncoder(dataclasses.replace(cfg, encoder_micro_batch=0), load_tokenizer(tok, cuda), cuda)
    assert auto.micro_batch == 4 and auto.graph.input.shape[0] == 4  # auto with NVDEC decode: 4-clip launches
    host = dataclasses.replace(cfg, encoder_micro_batch=0, decode_device="cpu")
    whole = ClipEncoder(host, load_tokenizer(tok, cuda), cuda)
    assert whole.micro_batch == 5 and whole.graph.input.shape[0] == 5  # auto with host decode: the whole batch


def test_decode_process_on_nvdec_writes_the_bytes_of_in_process_decoding(tok, tmp_path):
    """decode_process: NVDEC pipelines in a child process with its own CUDA context, frames back over CUDA
    IPC: the shards of in-process NVDEC decoding, byte for byte (batches of 5: 4-clip launches, auto)."""
    corpus = make_clean_corpus(tmp_path / "corpus", num=5, size=GPU_SIZE)
    runs = {}
    for name, process in (("thread", False), ("process", True)):
        out = tmp_path / name
        pretok = pretokenizer(gpu_config(tok, corpus, out, decode_pipelines=2, batch_size=5, decode_process=process,
                                         latent_dtype="bfloat16"))
        assert pretok.encoder.micro_batch == 4
        pretok.run()
        runs[name] = tree_bytes(out)
        log = json.loads(next((out / shards.LOG_DIR).glob("part-*.json")).read_text())
        assert log["decode_process"] is process and sum(log["clips_by_decoder"].values()) > 0
    assert runs["process"] == runs["thread"] and len(runs["thread"]) > 4


@pytest.mark.slow  # Inductor compiles the encoder
def test_compiled_encoder_is_no_farther_from_fp32_than_eager_and_reruns_identically(tok, tmp_path):
    """encoder_compile: Inductor's kernels, captured in the CUDA graph. Eager bf16 and compiled bf16
    shards are both judged against an fp32 encode of the same NVDEC frames (on the CPU: no TF32):
    compiled may be at most COMPILED_FACTOR farther than eager (not "close to eager": they round at
    different points, see COMPILED_FACTOR), and a compiled rerun writes the same bytes."""
    corpus = make_clean_corpus(tmp_path / "corpus", num=4, size=GPU_SIZE)
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True), ("compiled-again", True)):
        pretokenizer(gpu_config(tok, corpus, tmp_path / name, encoder_compile=compiled, num_partitions=1)).run()
        runs[name] = read_all(tmp_path / name)
    clips_cfg = pretok_config(tok, corpus, tmp_path / "x").clips
    plans = [p for r in read_manifest(corpus) for p in plan_clips(probe_video(r.path, "gpu"), clips_cfg)]
    frames = DaliClipDecoder(height=CLIP["height"], width=CLIP["width"], device="gpu", batch_size=3).decode(plans)
    with torch.no_grad():  # fp32 on the CPU, clip by clip (the encoder is per-sample)
        model = load_tokenizer(tok)
        reference = torch.cat([model.encode(frames_to_model_input(f.cpu())[None]) for f in frames])
    reference = reference.permute(0, 2, 1, 3, 4)  # stored latents are (T, d, H, W) per clip
    assert len(runs["compiled"]) == len(runs["eager"]) == len(reference) == 8
    d = {name: relative_distance(torch.stack([s["latent"] for s in runs[name]]), reference)
         for name in ("eager", "compiled")}
    between = relative_distance(torch.stack([s["latent"] for s in runs["compiled"]]),
                                torch.stack([s["latent"] for s in runs["eager"]]))
    print(f"relative L2 to the fp32 encode: eager bf16 {d['eager']:.4f}, compiled bf16 {d['compiled']:.4f}; "
          f"compiled to eager {between:.4f}")
    assert 1e-3 < d["eager"] < 0.05  # bf16 really ran, and the reference is the same clips (else far off)
    assert d["compiled"] <= COMPILED_FACTOR * d["eager"], d
    assert tree_bytes(tmp_path / "compiled") == tree_bytes(tmp_path / "compiled-again")


@pytest.mark.slow  # the benchmark end to end, small
def test_benchmark_smoke_on_gpu(tmp_path):
    from benchmarks.bench_pretokenize import main
    out = tmp_path / "bench.json"
    assert main(["--preset", "17x128", "--clips", "64", "--batch-size", "16", "--base-channels", "16",
                 "--res-blocks", "1", "--latent-dim", "16", "--encoder-iters", "2", "--decode-pipelines", "1,2",
                 "--encoder-memory-format", "both", "--full", "each", "--encoder-micro-batch", "0,4",
                 "--decode-stream-priority", "0,-5", "--profile-encoder", "--profile-batches", "1",
                 "--cpu-workers", "4", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["decode_only_clips_per_s"]) == {"1", "2"} and r["speedup_vs_pyav"] > 0
    assert len(r["full_runs"]) == 2 * 4 + 1  # 2 pipeline counts x 4 overlap setups, and the PyAV baseline
    assert all(b["clips"] == 64 and b["rejects"] == 0 and b["host_cores_busy"] > 0 for b in r["full_runs"].values())
    assert len(r["decode_beside_busy_encoder"]) == 4
    assert r["encoder_profile"]["timing"] == "CUDA kernel time"
    assert r["encoder_profile"]["encoder_phase_ms_per_batch_by_category"]["conv / GEMM"] > 0
