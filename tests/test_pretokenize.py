"""Pre-tokenization promises: shards equal a direct encode, honest rejects, byte-identical resume,
refused mismatches, deterministic partitions (CPU: DALI CPU decode, fp32 encode)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.pretokenize import clip_stream, encoder, writer
from data_prep.pretokenize.pipeline import Pretokenizer
from data_prep.pretokenize.worker import Worker, worker_from_env
from data_prep.reader import ShardReaderConfig, build_shard_loader
from data_prep.tokenizer_api import BitQuantizer, DecodingTokenizer, EncodingTokenizer, TokenizerGeometry, require
from data_prep.video import ClipSamplingConfig, DaliClipDecoder, frames_to_model_input, plan_clips, probe_video
from tests.pretok_helpers import (CLIP, COMPILED_FACTOR, SCHEDULE, make_clean_corpus, make_mixed_corpus,
                                  make_tiny_tokenizer, pretok_config, pretokenizer, relative_distance, tree_bytes)
from tokenizer import load_tokenizer
from tests.subprocess_env import child_env


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return make_clean_corpus(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    return make_mixed_corpus(tmp_path_factory.mktemp("mixed"))


@pytest.fixture(scope="module")
def clean_run(tok, clean, tmp_path_factory):
    """The uninterrupted reference run over the clean corpus (3 partitions, one worker)."""
    out = tmp_path_factory.mktemp("clean_run") / "shards"
    pretokenizer(pretok_config(tok, clean, out, num_partitions=3)).run()
    return out


def read_all(out: Path) -> list[dict]:
    loader = build_shard_loader(ShardReaderConfig(path=str(out), batch_size=1, shuffle=False, drop_last=False))
    samples = [{k: (v[0] if isinstance(v, (list, torch.Tensor)) else v) for k, v in b.items()} for b in loader]
    del loader
    return samples


def direct_encode(tok_dir: Path, manifest: Path, num_partitions: int, batch_size: int) -> list[dict]:
    """The reference: same clips, decoded by DaliClipDecoder and encoded batch by batch by hand."""
    model = load_tokenizer(tok_dir)
    q = model.quantizer_for(SCHEDULE)
    clips_cfg = ClipSamplingConfig(num_frames=9, frame_stride=1, clips_per_video=2, height=32, width=32)
    decoder = DaliClipDecoder(height=32, width=32, device="cpu", batch_size=batch_size)
    records = read_manifest(manifest)
    root = manifest.parent.resolve()
    out = []
    for p in range(num_partitions):
        jobs = []
        for i in shards.partition_range(p, num_partitions, len(records)):
            r = records[i]
            jobs += [(r, plan) for plan in plan_clips(probe_video(r.path), clips_cfg)]
        for k in range(0, len(jobs), batch_size):
            chunk = jobs[k:k + batch_size]
            frames = decoder.decode([plan for _, plan in chunk])
            with torch.no_grad():
                latent = model.encode(torch.stack([frames_to_model_input(f) for f in frames]))
            latent_BTdHW = latent.permute(0, 2, 1, 3, 4).float()
            b, t, d, h, w = latent_BTdHW.shape
            bits = q.flatten_bits(q.latent_to_bits(latent_BTdHW.reshape(b * t, d, h, w))).reshape(b, t, -1, d)
            for j, (r, plan) in enumerate(chunk):
                source = str(Path(r.path).relative_to(root))
                out.append({"latent": latent_BTdHW[j], "bits": bits[j], "label": r.label, "caption": r.caption,
                            "source": source, "clip_start": plan.start_frame,
                            "sample_id": shards.sample_id(source, plan.start_frame)})
    return out


def test_shards_equal_direct_encode(tok, clean, clean_run):
    got = read_all(clean_run)
    want = direct_encode(tok, clean, num_partitions=3, batch_size=3)
    assert len(got) == len(want) == 10  # 5 videos x 2 clips
    for g, w in zip(got, want):
        assert (g["source"], int(g["clip_start"])) == (w["source"], w["clip_start"])
        assert g["sample_id"] == w["sample_id"] and g["caption"] == w["caption"]
        assert int(g["label"]) == w["label"]
        assert g["latent"].dtype == torch.float32 and g["latent"].shape == (3, 8, 2, 2)
        assert torch.equal(g["latent"], w["latent"])
        assert g["bits"].dtype == torch.bool and g["bits"].shape == (3, 5, 8)
        assert torch.equal(g["bits"], w["bits"])
    manifest = shards.read_shard_manifest(clean_run)
    assert manifest["shapes"]["bits"] == [3, 5, 8] and manifest["scale_schedule"] == SCHEDULE
    assert manifest["tokenizer_hash"] == load_tokenizer(tok).content_hash


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_stored_latent_requantizes_to_stored_bits(tok, clean, tmp_path, dtype):
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, clean, out, latent_dtype=dtype, num_partitions=1)).run()
    q = load_tokenizer(tok).quantizer_for(SCHEDULE)
    reference = {s["sample_id"]: s for s in direct_encode(tok, clean, 1, 3)}
    for s in read_all(out):
        t, d, h, w = s["latent"].shape
        bits = q.flatten_bits(q.latent_to_bits(s["latent"].reshape(t, d, h, w))).reshape(t, -1, d)
        assert torch.equal(bits, s["bits"])  # exact: bits come from the latent as stored
        ref = reference[s["sample_id"]]["latent"]
        tol = 1e-2 if dtype == "bfloat16" else 2e-3
        assert torch.allclose(s["latent"], ref, atol=tol * ref.abs().max().item())


def test_rejects_have_reasons_and_everything_else_is_in_the_shards(tok, mixed, tmp_path):
    manifest, expected = mixed
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, manifest, out)).run()
    rejects = shards.read_rejects(out / shards.REJECTS_FILE)
    by_source = {}
    for r in rejects:
        by_source.setdefault(r["source"], []).append(r)
    assert set(by_source) == set(expected)
    h264 = by_source[next(s for s, k in expected.items() if k == "codec")][0]
    assert "codec 'h264' cannot be decoded by DALI on CPU" in h264["reason"] and h264["clip_start"] is None
    assert by_source["good/videos/does_not_exist.webm"][0]["kind"] == "missing"
    short = by_source[next(s for s, k in expected.items() if k == "too_short")][0]
    assert short["kind"] == "too_short" and "a clip needs 9" in short["reason"]
    trunc = by_source[next(s for s, k in expected.items() if k == "truncated")]
    assert trunc and all(r["reason"] for r in trunc)
    # every other video is in the shards with both its clips; nothing was substituted
    samples = read_all(out)
    good_sources = {r.path for r in read_manifest(manifest)} - {str(manifest.parent.resolve() / s) for s in expected}
    assert {manifest.parent.resolve() / s["source"] for s in samples} == {Path(p) for p in good_sources}
    assert len(samples) == 2 * len(good_sources) == 8
    assert json.loads((out / "COMMITTED").read_text())["rejects"] == len(rejects)


class CrashingWriter:
    """An MDSWriter that dies (like a killed job) after ``limit`` samples of the run."""

    written = 0
    limit = 0

    def __init__(self, **kwargs):
        from streaming import MDSWriter
        self.inner = MDSWriter(**kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            self.inner.finish()  # on a crash the partial shard stays as it is on disk
        return False

    def write(self, sample):
        if CrashingWriter.written >= CrashingWriter.limit:
            raise KeyboardInterrupt("simulated kill mid-partition")
        CrashingWriter.written += 1
        self.inner.write(sample)


def test_interrupted_run_resumes_byte_identical_and_mismatches_are_refused(tok, clean, clean_run, tmp_path,
                                                                           monkeypatch):
    out = tmp_path / "shards"
    cfg = pretok_config(tok, clean, out, num_partitions=3)
    # partition 0 holds videos 0..0 (2 clips) and partition 1 videos 1..2 (4 clips): die inside partition 1
    CrashingWriter.written, CrashingWriter.limit = 0, 3
    with monkeypatch.context() as m:
        m.setattr(writer, "_mds_writer", lambda: CrashingWriter)
        with pytest.raises(KeyboardInterrupt):
            pretokenizer(cfg).run()
    assert shards.committed_partitions(out, 3) == [0]
    assert (out / ".tmp-part-00001-of-00003").is_dir() and not (out / "COMMITTED").exists()
    with pytest.raises(shards.ShardsIncomplete, match="not a complete shard set"):
        build_shard_loader(ShardReaderConfig(path=str(out)))
    part0 = (out / "part-00000-of-00003" / "shard.00000.mds").stat().st_mtime_ns

    pretokenizer(cfg).run()  # resume
    assert (out / "part-00000-of-00003" / "shard.00000.mds").stat().st_mtime_ns == part0  # skipped
    assert not list(out.glob(".tmp-*"))
    assert tree_bytes(out) == tree_bytes(clean_run)

    # a rerun with another schedule, resolution or tokenizer is refused, naming the field
    with pytest.raises(shards.ShardManifestMismatch, match="'scale_schedule'"):
        pretokenizer(pretok_config(tok, clean, out, num_partitions=3, scale_schedule=[[2, 2]])).run()
    with pytest.raises(shards.ShardManifestMismatch, match="'resolution'"):
        pretokenizer(pretok_config(tok, clean, out, num_partitions=3, scale_schedule=[[1, 1], [2, 3]],
                                   clips={"width": 48})).run()
    other = make_tiny_tokenizer(tmp_path / "other_tok", seed=1)
    with pytest.raises(shards.ShardManifestMismatch, match="'tokenizer_hash'"):
        pretokenizer(pretok_config(other, clean, out, num_partitions=3)).run()
    assert tree_bytes(out) == tree_bytes(clean_run)  # refusals touched nothing


def test_two_workers_split_without_overlap_or_gap(tok, clean, clean_run, tmp_path):
    out = tmp_path / "shards"
    cfg = pretok_config(tok, clean, out, num_partitions=3)
    first = pretokenizer(cfg, Worker(1, 2)).run()  # owns partition 1
    assert [s.partition for s in first] == ["part-00001-of-00003"] and not (out / "COMMITTED").exists()
    second = pretokenizer(cfg, Worker(0, 2)).run()  # owns 0 and 2, then merges
    assert [s.partition for s in second] == ["part-00000-of-00003", "part-00002-of-00003"]
    assert tree_bytes(out) == tree_bytes(clean_run)
    ids = [s["sample_id"] for s in read_all(out)]
    assert len(ids) == len(set(ids)) == 10


@pytest.mark.parametrize("pipelines", [2, 3])
def test_shards_do_not_depend_on_the_decode_pipeline_count(tok, clean, clean_run, tmp_path, pipelines):
    # batch_size 3: two pipelines decode slices of 2 + 1 clips, three pipelines one clip each
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, clean, out, num_partitions=3, decode_pipelines=pipelines)).run()
    assert tree_bytes(out) == tree_bytes(clean_run)


def test_channels_last_encoder_agrees_with_contiguous(tok, clean, clean_run, tmp_path):
    out = tmp_path / "shards"
    pretok = pretokenizer(pretok_config(tok, clean, out, num_partitions=3, encoder_memory_format="channels_last"))
    layouts = []  # the layout every 3x3x3 conv of the encoder is fed: NDHWC, or the knob did nothing
    for conv in pretok.encoder.tokenizer.encoder.modules():
        if isinstance(conv, torch.nn.Conv3d) and conv.kernel_size == (3, 3, 3):
            conv.register_forward_pre_hook(
                lambda m, args: layouts.append(args[0].is_contiguous(memory_format=torch.channels_last_3d)))
    pretok.run()
    assert layouts and all(layouts)
    got, want = read_all(out), read_all(clean_run)
    assert len(got) == len(want) == 10
    for g, w in zip(got, want):
        assert g["sample_id"] == w["sample_id"]
        # Float rounding apart (measured 1e-4 of the largest latent; a layout mix-up is of order 1): CPU
        # GroupNorm sums an NDHWC tensor in another order and oneDNN picks other conv kernels. A bit flips
        # only where a quantizer residual is that close to zero: none on this corpus.
        assert torch.allclose(g["latent"], w["latent"], rtol=0, atol=1e-3 * w["latent"].abs().max().item())
        assert torch.equal(g["bits"], w["bits"])
    assert shards.read_shard_manifest(out) == shards.read_shard_manifest(clean_run)


def random_clips(n: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (CLIP["num_frames"], CLIP["height"], CLIP["width"], 3), generator=gen,
                          dtype=torch.uint8) for _ in range(n)]


def test_micro_batched_encoder_encodes_chunk_by_chunk_to_the_same_latents(tok, clean, tmp_path, monkeypatch):
    """encoder_micro_batch=2 on a batch of 5: the encoder sees 2, 2 and 1 clips; the latents match the
    whole-batch encoder's to float rounding (another batch size runs other kernels); auto = whole batch."""
    micro = encoder.ClipEncoder(pretok_config(tok, clean, tmp_path, batch_size=5, encoder_micro_batch=2),
                                load_tokenizer(tok, "cpu"), torch.device("cpu"))
    whole = encoder.ClipEncoder(pretok_config(tok, clean, tmp_path, batch_size=5), load_tokenizer(tok, "cpu"),
                                torch.device("cpu"))
    assert (micro.micro_batch, whole.micro_batch) == (2, 5)
    sizes, real = [], encoder.ClipEncoder._latent
    monkeypatch.setattr(encoder.ClipEncoder, "_latent", lambda self, x: (sizes.append(len(x)), real(self, x))[1])
    frames = random_clips(5, seed=0)
    got, want = micro.encode(frames, ["x"] * 5), whole.encode(frames, ["x"] * 5)
    assert sizes == [2, 2, 1, 5] and len(got.latents) == 5
    for x, y in zip(got.latents, want.latents):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)


@pytest.mark.slow  # Inductor compiles the encoder twice: 2-4 minutes on 2 busy CPU cores
def test_compiled_encoder_is_no_farther_from_fp64_than_eager_and_reruns_identically(tok, clean, tmp_path):
    """encoder_compile on CPU (fp32, Inductor's C++ kernels): the latents are judged against a float64
    encode of the same clips, as the GPU test judges bf16 against fp32 (COMPILED_FACTOR says why not
    against the eager encoder), a fresh compiled encoder reproduces them byte for byte, and the
    tokenizer (its content hash, recorded in manifest.json) is untouched."""
    cfg = pretok_config(tok, clean, tmp_path)
    eager = encoder.ClipEncoder(cfg, load_tokenizer(tok, "cpu"), torch.device("cpu"))
    compiled = encoder.ClipEncoder(dataclasses.replace(cfg, encoder_compile=True), load_tokenizer(tok, "cpu"),
                                   torch.device("cpu"))
    assert compiled._compiled_encode is not None and eager._compiled_encode is None
    assert compiled.tokenizer.content_hash == eager.tokenizer.content_hash
    frames = random_clips(3, seed=1)
    from torch._dynamo.utils import counters
    counters.clear()
    got, want = compiled.encode(frames, ["x"] * 3), eager.encode(frames, ["x"] * 3)
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled function ran (Dynamo captured a graph)
    with torch.no_grad():
        fp64 = load_tokenizer(tok, "cpu").double()
        reference = fp64.encode(torch.stack([frames_to_model_input(f) for f in frames]).double())
    reference = reference.permute(0, 2, 1, 3, 4)  # stored latents are (T, d, H, W) per clip
    d_eager = relative_distance(torch.from_numpy(np.stack(want.latents)), reference)
    d_compiled = relative_distance(torch.from_numpy(np.stack(got.latents)), reference)
    print(f"relative L2 to the fp64 encode: eager fp32 {d_eager:.3g}, compiled fp32 {d_compiled:.3g}")
    assert 0 < d_eager < 1e-4  # fp32 rounding of the same computation (a wrong reference would be far off)
    assert d_compiled <= COMPILED_FACTOR * d_eager, (d_compiled, d_eager)
    again = encoder.ClipEncoder(dataclasses.replace(cfg, encoder_compile=True), load_tokenizer(tok, "cpu"),
                                torch.device("cpu")).encode(frames, ["x"] * 3)
    for x, y in zip(got.latents + got.bits, again.latents + again.bits):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("total", [0, 1, 5, 7, 100, 1001])
@pytest.mark.parametrize("count", [1, 2, 3, 8])
def test_partition_ranges_cover_the_manifest_exactly(total, count):
    rows = [i for p in range(count) for i in shards.partition_range(p, count, total)]
    assert rows == list(range(total))


def test_worker_slots_from_launcher_env():
    assert worker_from_env({}) == Worker(0, 1, 0, "single")
    assert worker_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Worker(3, 4, 1, "torchrun")
    arr = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "5", "SLURM_ARRAY_TASK_COUNT": "4"}
    assert worker_from_env(arr) == Worker(2, 4, 0, "slurm-array")
    both = {**arr, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}
    assert worker_from_env(both) == Worker(5, 8, 1, "slurm-array+torchrun")
    with pytest.raises(ValueError, match="outside the array"):
        worker_from_env({**arr, "SLURM_ARRAY_TASK_ID": "9"})
    assert [Worker(1, 3).partitions(8)] == [[1, 4, 7]]


def test_config_errors_name_the_knob(tok, clean, tmp_path):
    with pytest.raises(ValueError, match="scale_schedule must end at the latent grid"):
        pretok_config(tok, clean, tmp_path, scale_schedule=[[1, 1], [4, 4]])
    with pytest.raises(ValueError, match="latent_dtype"):
        pretok_config(tok, clean, tmp_path, latent_dtype="int8")
    with pytest.raises(ValueError, match=r"decode_pipelines must be >= 0 \(0 = auto\), got -1"):
        pretok_config(tok, clean, tmp_path, decode_pipelines=-1)
    with pytest.raises(ValueError, match="decode_pipelines must be >= 1, got 0"):
        DaliClipDecoder(height=32, width=32, pipelines=0)
    with pytest.raises(ValueError, match=r"encoder_memory_format must be one of \['auto', 'channels_last', "
                                         r"'contiguous'\], got 'ndhwc'"):
        pretok_config(tok, clean, tmp_path, encoder_memory_format="ndhwc")
    with pytest.raises(ValueError, match="clips.num_frames"):
        pretokenizer(pretok_config(tok, clean, tmp_path, clips={"num_frames": 8}))
    with pytest.raises(ValueError, match=r"scale_schedule \(empty: the tokenizer's\) ends at \[2, 2\]"):
        pretokenizer(pretok_config(tok, clean, tmp_path, scale_schedule=[], clips={"height": 64}))
    with pytest.raises(ValueError, match=r"scale_schedule must be a list of \[h, w\] pairs"):
        pretok_config(tok, clean, tmp_path, scale_schedule=[[1, 1], [2]])
    # the tokenizer's quantizer checks the rest of the schedule, once the tokenizer is loaded
    with pytest.raises(ValueError, match="scale_schedule: scale schedule must grow monotonically"):
        pretokenizer(pretok_config(tok, clean, tmp_path, scale_schedule=[[2, 2], [1, 1], [2, 2]]))


def test_the_real_tokenizer_provides_what_data_prep_uses(tok, clean, tmp_path):
    model = load_tokenizer(tok)
    for obj, protocol in ((model, EncodingTokenizer), (model, DecodingTokenizer), (model.cfg, TokenizerGeometry),
                          (model.quantizer_for(SCHEDULE), BitQuantizer)):
        require(obj, protocol, "the tokenizer package")  # TypeError naming what it lacks

    class OnlyAHash:
        content_hash = "0" * 64

    with pytest.raises(TypeError, match=r"tokenizer .*: a OnlyAHash does not provide EncodingTokenizer \(missing "
                                        r"cfg, encode, encoder, quantizer_for\)"):
        Pretokenizer(pretok_config(tok, clean, tmp_path), Worker(0, 1), lambda path, device: OnlyAHash())


def test_merge_matches_streaming_merge_index(clean_run, tmp_path):
    from streaming.base.util import merge_index
    copy = tmp_path / "copy"
    import shutil
    shutil.copytree(clean_run, copy)
    (copy / "index.json").unlink()
    merge_index([str(p / "index.json") for p in sorted(copy.glob("part-*"))], str(copy))
    ours = json.loads((clean_run / "index.json").read_text())
    theirs = json.loads((copy / "index.json").read_text())
    assert ours == theirs
    assert np.sum([s["samples"] for s in ours["shards"]]) == 10


KILL_SCRIPT = """
import sys
from pathlib import Path
from tests.pretok_helpers import pretok_config, pretokenizer
tok, corpus, out = map(Path, sys.argv[1:4])
pretokenizer(pretok_config(tok, corpus, out, num_partitions=3, batch_size=1, shard_size_limit=1024)).run()
"""


def test_sigkill_mid_partition_then_resume_is_byte_identical(tok, clean, tmp_path):
    import signal
    import subprocess
    import sys
    import time
    args = [str(tok), str(clean)]
    env = child_env()
    reference = tmp_path / "reference"
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args, str(reference)], env=env, check=True, timeout=300)
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, *args, str(out)], env=env)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list(out.glob(".tmp-part-00001-of-00003/shard.*.mds"))) >= 2:  # mid-partition, shards on disk
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert proc.wait(timeout=60) == -signal.SIGKILL, "the run finished before it could be killed"
    assert shards.committed_partitions(out, 3) == [0] and not (out / "COMMITTED").exists()
    subprocess.run([sys.executable, "-c", KILL_SCRIPT, *args, str(out)], env=env, check=True, timeout=300)
    assert tree_bytes(out) == tree_bytes(reference)
    assert len(list(reference.glob("part-00001-of-00003/shard.*.mds"))) >= 2


class FlakyDecoder:
    """Wraps the real decoder; fails the clips whose (file name, start) are listed, or every clip."""

    def __init__(self, inner, fail: set | None):
        self.inner, self.fail, self.device = inner, fail, inner.device

    def decode(self, plans):
        from data_prep.video import VideoUnusable
        out = self.inner.decode(plans)
        return [VideoUnusable("decode error: injected", "decode_error")
                if self.fail is None or (Path(p.path).name, p.start_frame) in self.fail else r
                for p, r in zip(plans, out)]


def flaky_lanes(monkeypatch, fail) -> None:
    """Every decoder lane's decoder wrapped in a FlakyDecoder failing ``fail``."""
    real = clip_stream.decoder_lanes

    def lanes(*args, **kwargs):
        return [dataclasses.replace(lane, make_decoder=lambda make=lane.make_decoder: FlakyDecoder(make(), fail))
                for lane in real(*args, **kwargs)]
    monkeypatch.setattr(clip_stream, "decoder_lanes", lanes)


def test_a_clip_that_fails_to_decode_is_rejected_alone(tok, clean, clean_run, tmp_path, monkeypatch):
    records = read_manifest(clean)
    victim = (Path(records[1].path).name, 3)  # the second clip (start 3) of video 1
    flaky_lanes(monkeypatch, {victim})
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, clean, out, num_partitions=3)).run()
    (reject,) = shards.read_rejects(out / shards.REJECTS_FILE)
    assert (reject["row"], reject["clip_start"], reject["kind"]) == (1, 3, "decode_error")
    got = {s["sample_id"]: s for s in read_all(out)}
    want = {s["sample_id"]: s for s in read_all(clean_run)}
    assert set(want) - set(got) == {shards.sample_id(reject["source"], 3)}
    assert len(got) == 9  # the other clip of that video is kept; nothing substituted


def test_a_broken_decoder_aborts_instead_of_rejecting_everything(tok, tmp_path, monkeypatch):
    corpus = make_clean_corpus(tmp_path / "corpus", num=17)  # 34 clips
    flaky_lanes(monkeypatch, None)
    out = tmp_path / "shards"
    with pytest.raises(writer.DecoderBroken, match=r"32 of 32 clips failed to decode with dali on cpu"):
        pretokenizer(pretok_config(tok, corpus, out, num_partitions=1, batch_size=8)).run()
    assert shards.committed_partitions(out, 1) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only host error")
def test_gpu_decode_on_a_cpu_host_is_an_early_error(tok, clean, tmp_path):
    with pytest.raises(ValueError, match="decode_device=gpu needs CUDA"):
        pretokenizer(pretok_config(tok, clean, tmp_path, decode_device="gpu"))


def test_manifest_start_end_and_fps_columns_shape_the_clips(tok, tmp_path):
    # 12-frame videos at 8 fps (1.5 s). Row 0: clips between 0.25 s and 1.5 s; row 1: the fps column
    # says 16 fps, so target_fps 8 strides by 2 and one 9-frame clip needs 17 frames (rejected).
    corpus = make_clean_corpus(tmp_path / "corpus", num=2)
    header, row0, row1 = corpus.read_text().splitlines()
    assert header == "path,caption,label,start,end,fps"
    corpus.write_text("\n".join([header, row0.removesuffix(",,,") + ",0.25,1.5,", row1.removesuffix(",,,") + ",,,16"]))
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, corpus, out, num_partitions=1)).run()
    assert [int(s["clip_start"]) for s in read_all(out)] == [2, 3, 0, 3]  # fps only matters with target_fps
    out2 = tmp_path / "shards_fps"
    pretokenizer(pretok_config(tok, corpus, out2, num_partitions=1, clips={"target_fps": 8.0})).run()
    (reject,) = shards.read_rejects(out2 / shards.REJECTS_FILE)
    assert reject["row"] == 1 and "a clip needs 17 (9 frames at stride 2; 16 fps from the manifest)" in reject["reason"]


def test_non_finite_latents_fail_loudly_instead_of_being_written(tok, clean, tmp_path, monkeypatch):
    real = encoder.ClipEncoder.__init__

    def huge(self, cfg, tokenizer, device):  # a tokenizer whose latents overflow float16 storage
        real(self, cfg, tokenizer, device)
        encode = self.tokenizer.encode
        self.tokenizer.encode = lambda video: encode(video) * 1e6

    monkeypatch.setattr(encoder.ClipEncoder, "__init__", huge)
    out = tmp_path / "shards"
    with pytest.raises(FloatingPointError, match=r"latent_dtype=float16 \(float16 overflows past 65504"):
        pretokenizer(pretok_config(tok, clean, out, latent_dtype="float16")).run()
    assert shards.committed_partitions(out, 2) == []
