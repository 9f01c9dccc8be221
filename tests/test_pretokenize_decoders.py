"""Several decoders feeding one encoder: DALI pipelines and PyAV decoders pulling clips from one queue.
Which decoder took a clip must not change a byte of the shards, so PyAV decodes the same pixels as
DALI's CPU decoder (its colour conversion and its resize), codecs DALI cannot decode go to PyAV only,
and NVDEC, whose pixels differ, is never mixed with the CPU decoders. The decoders may run in a process of
their own (decode_process): the same bytes, and a crash there fails the partition loudly."""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.pretokenize import clip_stream
from data_prep.pretokenize.config import PretokenizeConfig, encoder_micro_batch
from data_prep.pretokenize.decode_process import SLOTS, DecodeProcess, DecodeProcessFailed
from data_prep.pretokenize.decoders import DecoderLanes
from data_prep.synth import make_corpus
from data_prep.video import ClipPlan, DaliClipDecoder, PyAVClipDecoder
from tests.pretok_helpers import make_tiny_tokenizer, pretok_config, pretokenizer, tree_bytes
from tests.test_pretokenize_timing import irregular_times, write_timed_video


def combined_manifest(root: Path, manifests: list[Path]) -> Path:
    """One manifest over the rows of several (paths relative to ``root``)."""
    rows = []
    for m in manifests:
        with open(m) as f:
            for row in csv.DictReader(f):
                rows.append({**row, "path": str((m.parent / row["path"]).relative_to(root))})
    out = root / "metadata.csv"
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["path", "caption", "label"], lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: row[k] for k in ("path", "caption", "label")})
    return out


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tok")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """VP9 and MJPEG videos of two sizes, and a variable-rate VP9 video."""
    root = tmp_path_factory.mktemp("corpus")
    vfr = root / "vfr"
    vfr.mkdir()
    write_timed_video(vfr / "vfr.webm", irregular_times(40, 30, 110, seed=7), size=(50, 70))
    (vfr / "m.csv").write_text("path,caption,label\nvfr.webm,a timed video,1\n")
    return combined_manifest(root, [
        make_corpus(root / "vp9", num=3, classes=2, codec="vp9", frames=12, size=(48, 64), fps=8, seed=1),
        make_corpus(root / "mjpeg", num=2, classes=2, codec="mjpeg", frames=12, size=(50, 90), fps=8, seed=2),
        vfr / "m.csv"])


def test_pyav_decodes_the_pixels_of_dali_cpu_bit_for_bit(tmp_path, corpus):
    """Same libavcodec frames, DALI's libswscale conversion (BT.601 whatever the tag) and DALI's resize."""
    import av
    frames = np.random.default_rng(0).integers(0, 255, (6, 50, 70, 3), dtype=np.uint8)
    retagged = tmp_path / "bt709.webm"  # a source tagged BT.709: PyAV's default would convert it differently
    with av.open(str(retagged), "w") as out:
        s = out.add_stream("libvpx-vp9", rate=8)
        s.width, s.height, s.pix_fmt = 70, 50, "yuv420p"
        s.codec_context.colorspace, s.codec_context.color_range = 1, 1  # BT.709, limited
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(p)
        for p in s.encode():
            out.mux(p)
    with av.open(str(retagged)) as c:
        assert next(c.decode(video=0)).colorspace == 1
    paths = [r.path for r in read_manifest(corpus)] + [str(retagged)]
    plans = [ClipPlan(path=p, start_frame=s, stride=st, num_frames=5) for p in paths for s, st in ((0, 1), (1, 1))]
    plans.append(ClipPlan(path=paths[-2], start_frame=1, stride=0, num_frames=5, indices=(1, 2, 2, 4, 9)))
    for h, w in [(32, 32), (48, 64), (32, 48)]:
        dali = DaliClipDecoder(height=h, width=w, batch_size=4).decode(plans)
        pyav = PyAVClipDecoder(height=h, width=w).decode(plans)
        assert len(dali) == len(pyav) == len(plans)
        for plan, a, b in zip(plans, dali, pyav):
            assert a.shape == (5, h, w, 3) and torch.equal(a, b), (plan, (a.int() - b.int()).abs().max())


def shard_files(root: Path) -> dict[str, bytes]:
    """Every file of a shard directory but manifest.json (which records the decoder setting) and logs."""
    return {k: v for k, v in tree_bytes(root).items() if k != "manifest.json"}


def decoded_by(root: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for log in (root / shards.LOG_DIR).glob("part-*.json"):
        for lane, n in json.loads(log.read_text())["clips_by_decoder"].items():
            counts[lane] = counts.get(lane, 0) + n
    return counts


def test_shards_do_not_depend_on_which_decoder_took_a_clip(tmp_path, tok, corpus):
    """1 DALI CPU pipeline vs 2 vs 1 + 2 PyAV decoders (1, 2 or 4 batches in flight) vs PyAV only: the
    same bytes."""
    runs = {"dali-1": {}, "dali-2": {"decode_pipelines": 2}, "mixed": {"pyav_decoders": 2},
            "mixed-1-in-flight": {"pyav_decoders": 2, "prefetch_batches": 1},
            "mixed-4-in-flight": {"pyav_decoders": 2, "prefetch_batches": 4},
            "pyav-only": {"decoder": "pyav", "pyav_decoders": 3}}
    got = {}
    for name, knobs in runs.items():
        out = tmp_path / name
        pretokenizer(pretok_config(tok, corpus, out, clips={"target_fps": 8.0}, **knobs)).run()
        got[name] = shard_files(out)
        manifest = shards.read_shard_manifest(out)
        assert manifest["decoder"] == knobs.get("decoder", "dali") and manifest["decode_device"] == "cpu"
    assert len(shards.read_index(tmp_path / "dali-1")) == 2 and sum(
        1 for _ in (tmp_path / "dali-1").rglob("*.mds")) == 2
    for name in runs:
        assert got[name] == got["dali-1"], name
    lanes = decoded_by(tmp_path / "mixed")
    assert sum(lanes.values()) == 12  # 6 videos x 2 clips
    assert lanes["dali-cpu-0"] > 0 and lanes["pyav-0"] + lanes["pyav-1"] > 0  # both kinds took clips
    assert set(decoded_by(tmp_path / "dali-2")) == {"dali-cpu-0", "dali-cpu-1"}


def test_codecs_dali_cannot_decode_on_cpu_go_to_the_pyav_decoders(tmp_path, tok):
    root = tmp_path / "c"
    corpus = combined_manifest(root, [
        make_corpus(root / "vp9", num=2, classes=2, codec="vp9", frames=12, size=(48, 64), fps=8, seed=1),
        make_corpus(root / "h264", num=2, classes=2, codec="h264", frames=12, size=(48, 64), fps=8, seed=3)])
    dali = tmp_path / "dali"
    pretokenizer(pretok_config(tok, corpus, dali, num_partitions=1)).run()
    rejects = shards.read_rejects(dali / shards.REJECTS_FILE)
    assert [(r["row"], r["kind"]) for r in rejects] == [(2, "codec"), (3, "codec")]
    mixed, pyav = tmp_path / "mixed", tmp_path / "pyav"
    pretokenizer(pretok_config(tok, corpus, mixed, num_partitions=1, pyav_decoders=1)).run()
    pretokenizer(pretok_config(tok, corpus, pyav, num_partitions=1, decoder="pyav", decode_threads=2)).run()
    assert shards.read_rejects(mixed / shards.REJECTS_FILE) == []
    assert shard_files(mixed) == shard_files(pyav)
    lanes = decoded_by(mixed)
    assert lanes["pyav-0"] >= 4 and sum(lanes.values()) == 8  # the h264 clips could only go there


def test_nvdec_is_never_mixed_with_cpu_decoders(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"pyav_decoders > 0 with NVDEC decode \(decode_device=gpu\).*"
                                         r"Set pyav_decoders: 0, or decode on the CPU \(decode_device: cpu\)"):
        pretok_config(tok, corpus, tmp_path, decode_device="gpu", pyav_decoders=2)
    with pytest.raises(ValueError, match="pyav_decoders must be >= 0, got -1"):
        pretok_config(tok, corpus, tmp_path, pyav_decoders=-1)
    assert clip_stream.decoder_lanes(pretok_config(tok, corpus, tmp_path, decoder="pyav", decode_threads=3),
                                     "cpu", 0)[-1].name == "pyav-2"


class BrokenDecoder:
    """A decoder with a bug: it raises instead of returning a reason per clip."""

    def decode(self, plans):
        raise KeyError("a bug in a decoder")


def test_a_decoder_that_crashes_stops_the_run_instead_of_hanging(tmp_path, tok, corpus, monkeypatch):
    real = clip_stream.decoder_lanes

    def lanes(*args, **kwargs):
        good, *rest = real(*args, **kwargs)
        return [good, *(dataclasses.replace(lane, make_decoder=BrokenDecoder) for lane in rest)]
    monkeypatch.setattr(clip_stream, "decoder_lanes", lanes)
    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match=r"a decoder lane failed: KeyError\('a bug in a decoder'\)"):
        pretokenizer(pretok_config(tok, corpus, out, num_partitions=1, pyav_decoders=2)).run()
    assert shards.committed_partitions(out, 1) == []


def test_config_knobs_of_the_overlap_name_themselves(tok, corpus, tmp_path):
    with pytest.raises(ValueError, match=r"encoder_micro_batch must be >= 0 \(0 = auto: 4 with NVDEC decode, else "
                                         r"the whole batch\), got -1"):
        pretok_config(tok, corpus, tmp_path, encoder_micro_batch=-1)
    with pytest.raises(ValueError, match=r"decode_stream_priority must be <= 0 .*got 2"):
        pretok_config(tok, corpus, tmp_path, decode_stream_priority=2)
    assert isinstance(pretok_config(tok, corpus, tmp_path, decode_stream_priority=-5), PretokenizeConfig)


def test_encoder_micro_batch_auto_is_4_with_nvdec_and_the_whole_batch_otherwise(tok, corpus, tmp_path):
    """auto: 4-clip launches where NVDEC decodes on the encoder's GPU (they won there, session 7), the
    whole batch where the host decodes; an explicit value is kept; never more than batch_size; the
    decode process does not change it (its shards must be the in-process bytes)."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # a device object needs no GPU

    def micro(device, **knobs):
        return encoder_micro_batch(pretok_config(tok, corpus, tmp_path, **{"batch_size": 32, **knobs}), device)
    assert micro(cuda, decode_device="auto") == micro(cuda, decode_device="gpu") == 4
    assert micro(cuda, decode_device="gpu", decode_process=True) == 4
    assert micro(cuda, decode_device="cpu") == micro(cuda, decode_device="auto", pyav_decoders=2) == 32
    assert micro(cpu, decode_device="auto") == 32
    assert micro(cuda, decode_device="gpu", encoder_micro_batch=8) == 8
    assert micro(cuda, decode_device="gpu", batch_size=3) == 3


def test_decoders_in_a_process_of_their_own_write_the_same_bytes(tmp_path, tok, corpus):
    """decode_process: the same lanes (a DALI CPU pipeline and a PyAV decoder) in a spawned child, frames
    back over shared memory: the shards of in-process decoding, byte for byte; the log counts the child's
    lanes."""
    knobs = {"clips": {"target_fps": 8.0}, "pyav_decoders": 1}
    here, there = tmp_path / "here", tmp_path / "there"
    pretokenizer(pretok_config(tok, corpus, here, **knobs)).run()
    pretok = pretokenizer(pretok_config(tok, corpus, there, decode_process=True, **knobs))
    pretok.run()
    assert pretok.stream.decode_process is None  # closed with the run
    assert shard_files(there) == shard_files(here) and len(shard_files(here)) > 4
    lanes = decoded_by(there)
    assert sum(lanes.values()) == 12 and set(lanes) == {"dali-cpu-0", "pyav-0"}
    logs = [json.loads(f.read_text()) for f in (there / shards.LOG_DIR).glob("part-*.json")]
    assert logs and all(log["decode_process"] for log in logs)
    # what the hand-off cost, per partition: the child's stacking and the parent's receiving, positive
    # where the partition received batches; absent without a decode process
    assert all(set(log["decode_process_handoff_s"]) == {"stack", "receive"} for log in logs)
    assert sum(log["decode_process_handoff_s"]["receive"] for log in logs) > 0
    assert all(v >= 0 for log in logs for v in log["decode_process_handoff_s"].values())
    here_logs = [json.loads(f.read_text()) for f in (here / shards.LOG_DIR).glob("part-*.json")]
    assert here_logs and all(log["decode_process_handoff_s"] is None for log in here_logs)


def test_a_killed_decode_process_fails_the_partition_and_a_rerun_redoes_it(tmp_path, tok):
    """The child dies mid-partition (SIGKILL, as the out-of-memory killer does): the run raises naming the
    decode process and its exit code, nothing is committed, and a rerun writes the bytes of a run that
    was never interrupted."""
    corpus = make_corpus(tmp_path / "c", num=8, classes=2, codec="vp9", frames=12, size=(48, 64), fps=8, seed=4)
    knobs = {"num_partitions": 1, "prefetch_batches": 1}  # 16 clips, 6 batches: most not yet submitted
    clean, out = tmp_path / "clean", tmp_path / "out"
    pretokenizer(pretok_config(tok, corpus, clean, **knobs)).run()
    pretok = pretokenizer(pretok_config(tok, corpus, out, decode_process=True, **knobs))
    killed = []

    def kill_once(stats):
        if not killed:
            killed.append(pretok.stream.decode_process.pid)
            os.kill(killed[0], signal.SIGKILL)
    with pytest.raises(DecodeProcessFailed, match=r"decode process \(decode_process: true, pid \d+\) died with "
                                                  r"exit code -9 .*nothing of the partition was committed"):
        pretok.run(progress=kill_once)
    assert killed and shards.committed_partitions(out, 1) == []
    pretokenizer(pretok_config(tok, corpus, out, decode_process=True, **knobs)).run()
    assert tree_bytes(out) == tree_bytes(clean)


def test_an_error_in_the_decode_process_comes_back_with_the_childs_traceback(tmp_path, tok, corpus):
    """A child that cannot set up its decoders (NVDEC on GPU 99: no such device here or anywhere) fails
    at start with its own exception and traceback, instead of leaving the parent waiting."""
    cfg = pretok_config(tok, corpus, tmp_path, decode_device="cpu")
    lanes = clip_stream.decoder_lanes(cfg, "gpu", 99)
    with pytest.raises(DecodeProcessFailed, match=r"(?s)decode process \(decode_process: true, pid \d+\) failed: "
                                                  r".*child traceback.*set_device"):
        DecodeProcess(cfg, "gpu", 99, lanes)


def test_the_decode_process_reuses_its_batch_buffers_and_hands_over_the_lanes_frames(tmp_path, tok, corpus):
    """Seven batches submitted at once to a decode process (DALI CPU lanes): each result equals the
    in-process lanes' frames byte for byte, a clip past its video's end fails with the same reason, and
    results stay intact while later batches pass through the same slots (the parent owns its copy).
    Only SLOTS batch buffers ever crossed between the processes; the other hand-offs sent a slot number."""
    cfg = pretok_config(tok, corpus, tmp_path, batch_size=3)
    vp9 = [r.path for r in read_manifest(corpus) if "/vp9/" in r.path]
    plans = [ClipPlan(path=p, start_frame=s, stride=1, num_frames=5) for s in range(7) for p in vp9]
    plans[4] = ClipPlan(path=vp9[0], start_frame=100, stride=1, num_frames=5)  # past the end: rejected
    batches = [plans[i:i + 3] for i in range(0, len(plans), 3)]
    assert len(batches) == 7 > SLOTS

    def decode_all(lanes):
        tickets = [lanes.submit(batch, ["vp9"] * len(batch)) for batch in batches]
        return [lanes.result(t)[0] for t in tickets]
    here = DecoderLanes(clip_stream.decoder_lanes(cfg, "cpu", 0))
    try:
        expected = decode_all(here)
    finally:
        here.close()
    there = DecodeProcess(cfg, "cpu", 0, clip_stream.decoder_lanes(cfg, "cpu", 0))
    try:
        got = decode_all(there)
        assert there.buffers_received == SLOTS
    finally:
        there.close()
    for batch_got, batch_expected in zip(got, expected):
        for a, b in zip(batch_got, batch_expected):
            if isinstance(b, torch.Tensor):
                assert isinstance(a, torch.Tensor) and a.shape == (5, 32, 32, 3) and torch.equal(a, b)
            else:
                assert (a.reason, a.kind) == (b.reason, b.kind)
    assert sum(not isinstance(r, torch.Tensor) for batch in got for r in batch) == 1
