"""Real-world frame timing: clips of a variable-rate video are picked by presentation time (the frame
nearest each target time) on every decoder; constant-rate videos keep their index striding, so their
shards do not change; a video declaring a wrong rate is measured, and a rejection names both rates.

Every expectation is computed from the timestamps the test wrote into the files, never from the code's
own reading of them: each frame of a test video is a flat grey whose level encodes its index."""
from __future__ import annotations

import fractions
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.frame_times import stream_timing
from data_prep.manifest import VideoRecord, read_manifest, write_manifest
from data_prep.shard_inspect import _source_clip  # noqa: PLC2701 - the inspect path under test
from data_prep.video import (ClipPlan, ClipSamplingConfig, DaliClipDecoder, PyAVClipDecoder, StridedRange,
                             VideoInfo, VideoUnusable, clip_at, plan_clips, probe_video)
from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer, pretok_config, pretokenizer
from tests.test_pretokenize import read_all

LEVEL0, LEVEL_STEP = 16, 4  # frame i is grey 16 + 4 i: identifiable after lossy coding and resizing
ENCODERS = {"vp9": ("libvpx-vp9", "webm", "yuv420p", {"deadline": "good", "cpu-used": "4", "crf": "10", "b": "0"}),
            "mjpeg": ("mjpeg", "mkv", "yuvj420p", {"q:v": "2"})}


def write_timed_video(path: Path, times_ms: list[int], codec: str = "vp9", declared_fps: int | None = None,
                      size: tuple[int, int] = (48, 64)) -> Path:
    """Frame i shown at ``times_ms[i]`` (a 1 ms time base), grey level ``LEVEL0 + LEVEL_STEP * i``;
    ``declared_fps`` is what the container claims (None: the muxer's default)."""
    import av
    encoder, _, pix_fmt, options = ENCODERS[codec]
    ms = fractions.Fraction(1, 1000)
    with av.open(str(path), "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(encoder, rate=declared_fps, options=dict(options)) if declared_fps \
            else container.add_stream(encoder, options=dict(options))
        stream.width, stream.height, stream.pix_fmt = size[1], size[0], pix_fmt
        stream.codec_context.time_base = stream.time_base = ms
        for i, t in enumerate(times_ms):
            frame = av.VideoFrame.from_ndarray(np.full((*size, 3), LEVEL0 + LEVEL_STEP * i, np.uint8), format="rgb24")
            frame.pts, frame.time_base = t, ms
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def frame_ids(frames_FHWC: torch.Tensor) -> list[int]:
    """Which source frame each decoded frame is (from its grey level)."""
    levels = frames_FHWC.float().mean(dim=(1, 2, 3))
    return [round((v - LEVEL0) / LEVEL_STEP) for v in levels.tolist()]


def irregular_times(num: int, lo: int, hi: int, seed: int) -> list[int]:
    gaps = np.random.default_rng(seed).integers(lo, hi + 1, num - 1)
    return np.concatenate([[0], np.cumsum(gaps)]).astype(int).tolist()


def decoders():
    return {"dali-cpu": DaliClipDecoder(height=32, width=32, batch_size=4),
            "pyav": PyAVClipDecoder(height=32, width=32, num_threads=1)}


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_variable_rate_clip_frames_lie_within_half_a_target_period_of_their_target_times(tmp_path, codec):
    target_fps, period_ms = 8.0, 125.0
    times = irregular_times(60, 20, 120, seed=1)  # gaps of 20-120 ms: never longer than a target period
    path = write_timed_video(tmp_path / f"vfr.{ENCODERS[codec][1]}", times, codec)
    cfg = ClipSamplingConfig(num_frames=17, target_fps=target_fps, clips_per_video=3, height=32, width=32)
    info = probe_video(path)
    assert info.frame_times is not None  # irregular: cut by time
    plans = plan_clips(info, cfg)
    assert len(plans) == 3 and all(p.stride == 0 for p in plans)
    clip_span = 16 * period_ms
    starts = [times[p.start_frame] for p in plans]  # spread over the video: first, middle, last
    assert starts[0] == 0 and abs(starts[2] + clip_span - times[-1]) <= 120 / 2 + 1e-9
    for name, decoder in decoders().items():
        for plan, frames in zip(plans, decoder.decode(plans)):
            ids = frame_ids(frames)
            assert ids[0] == plan.start_frame, name
            for k, i in enumerate(ids):
                target = times[ids[0]] + k * period_ms
                assert abs(times[i] - target) <= period_ms / 2, (name, k, i, times[i], target)
                assert abs(times[i] - target) == min(abs(t - target) for t in times), (name, k)  # the nearest


def test_a_gap_longer_than_a_target_period_repeats_the_frame_shown_then(tmp_path):
    times = list(range(0, 1000, 50)) + list(range(1600, 3000, 50))  # a 600 ms freeze after 1 s
    path = write_timed_video(tmp_path / "freeze.webm", times)
    cfg = ClipSamplingConfig(num_frames=9, target_fps=8.0, clips_per_video=5, height=32, width=32)
    plans = plan_clips(probe_video(path), cfg)
    crossing = [p for p in plans if times[p.start_frame] < 1000 < times[p.start_frame] + 8 * 125]
    assert crossing
    for plan, frames in zip(plans, decoders()["dali-cpu"].decode(plans)):
        ids = frame_ids(frames)
        targets = [times[ids[0]] + k * 125 for k in range(9)]
        assert all(abs(times[i] - t) == min(abs(s - t) for s in times) for i, t in zip(ids, targets))
    ids = frame_ids(decoders()["dali-cpu"].decode(crossing[:1])[0])
    assert len(set(ids)) < len(ids)  # the frame on screen during the freeze, repeated


def test_a_video_declaring_1000_fps_with_60_frames_over_7_4_s_is_timed_not_rejected(tmp_path):
    """The issue's phone recording: 60 frames over 7.4 s (about 8 fps) in a container that says 1000 fps.
    Striding by the declared rate needed 2001 frames for a clip under target_fps 8."""
    times = np.round(np.linspace(0, 7400, 60)).astype(int).tolist()
    path = write_timed_video(tmp_path / "phone.webm", times, declared_fps=1000)
    info = probe_video(path)
    assert info.timing.declared_fps == 1000 and info.fps == pytest.approx(59 / 7.4, rel=1e-3)
    cfg = ClipSamplingConfig(num_frames=17, target_fps=8.0, clips_per_video=2, height=32, width=32)
    plans = plan_clips(info, cfg)
    for plan, frames in zip(plans, DaliClipDecoder(height=32, width=32).decode(plans)):
        ids = frame_ids(frames)
        assert all(abs(times[i] - (times[ids[0]] + 125 * k)) <= 62.5 for k, i in enumerate(ids))
    # through the production pipeline: written, clip_stride 0 (by time), rebuilt by `shards inspect`
    tok = make_tiny_tokenizer(tmp_path / "tok", schedule=[[1, 1], [2, 2]])
    manifest = write_manifest(tmp_path / "m.csv", [VideoRecord(path=str(path), caption="phone", label=0)],
                              relative_to=tmp_path)
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, manifest, out, num_partitions=1, clips={"num_frames": 17, "target_fps": 8.0})).run()
    samples = read_all(out)
    assert [int(s["clip_start"]) for s in samples] == [p.start_frame for p in plans]
    raw = _raw_samples(out)
    assert [int(r["clip_stride"]) for r in raw] == [0, 0]
    run_manifest = shards.read_shard_manifest(out)
    for s, r, plan in zip(samples, raw, plans):
        assert _source_clip(path, s, r, run_manifest) == plan
    # a clip that cannot fit is rejected naming both rates
    long = ClipSamplingConfig(num_frames=65, target_fps=8.0, height=32, width=32)
    with pytest.raises(VideoUnusable, match=r"too short: 60 usable frames over 7.4 s, a clip of 65 frames at "
                                        r"target_fps 8 needs 8 s \(declared 1000 fps, measured 7.97 fps\)"):
        plan_clips(info, long)


def _raw_samples(directory: Path) -> list[dict]:
    from streaming.base.format import reader_from_json
    (shard,) = shards.read_index(directory)
    reader = reader_from_json(str(directory), None, shard)
    return [reader.get_item(i) for i in range(reader.samples)]


def test_constant_rate_videos_keep_index_striding(tmp_path):
    """Constant-rate files plan exactly as before timestamps were read: start = first + room * i // (n - 1),
    stride = round(fps / target_fps); the run manifest and shards of such corpora are therefore unchanged
    (checked once against shards written by the previous code; see the report of the change)."""
    cases = [(Path(read_manifest(make_clean_corpus(tmp_path / "synth", num=1))[0].path), 8, 12)]
    for fps, frames in ((25, 60), (30, 40), (24, 31)):  # webm's 1 ms time base rounds 30 and 24 fps periods
        times = np.round(np.arange(frames) * 1000 / fps).astype(int).tolist()
        cases.append((write_timed_video(tmp_path / f"cfr{fps}.webm", times, declared_fps=fps), fps, frames))
    for path, fps, frames in cases:
        info = probe_video(path)
        assert info.frame_times is None and info.fps == fps and info.num_frames == frames
        for target, stride_frames, n in ((8.0, 1, 3), (0.0, 2, 2), (12.0, 1, 1), (8.0, 1, 1)):
            cfg = ClipSamplingConfig(num_frames=5, target_fps=target, frame_stride=stride_frames, clips_per_video=n,
                                     height=32, width=32)
            stride = max(1, round(fps / target)) if target else stride_frames
            room = frames - ((5 - 1) * stride + 1)
            want = [ClipPlan(path=str(path), start_frame=room * i // (n - 1) if n > 1 else room // 2, stride=stride,
                             num_frames=5) for i in range(n)]
            assert plan_clips(info, cfg) == list(dict.fromkeys(want)), (path.name, target, n)


def test_the_rate_is_measured_where_the_stream_has_no_timestamps():
    """No per-packet timestamps (a raw stream): frames over the stream's duration, not the declared rate."""
    timing = stream_timing(None, 0.0, declared_fps=1000.0, duration_s=7.4, num_frames=60)
    assert timing.frame_times is None and timing.fps == pytest.approx(60 / 7.4)
    assert timing.describe() == "declared 1000 fps, measured 8.11 fps"
    agreeing = stream_timing(None, 0.0, declared_fps=25.0, duration_s=2.4, num_frames=60)
    assert agreeing.fps == 25.0  # within 1%: the declared rate, as before
    unknown = stream_timing(None, 0.0, declared_fps=25.0, duration_s=None, num_frames=60)
    assert unknown.fps == 25.0 and unknown.describe() == "declared 25 fps, measured unknown"
    info = VideoInfo(path="raw.h264", codec="h264", num_frames=60, fps=timing.fps, height=48, width=64, timing=timing)
    cfg = ClipSamplingConfig(num_frames=17, target_fps=8.0, height=32, width=32)
    assert StridedRange(info, cfg, None, None).stride == 1  # 8.1 fps / 8: every frame, not every 125th
    with pytest.raises(VideoUnusable,
                       match=r"a clip needs 81 \(17 frames at stride 5; declared 1000 fps, measured 8.11 fps\)"):
        plan_clips(info, ClipSamplingConfig(num_frames=17, frame_stride=5, height=32, width=32))


def test_clip_at_rebuilds_a_stored_clip_and_refuses_a_replaced_video(tmp_path):
    times = irregular_times(30, 30, 110, seed=4)
    path = write_timed_video(tmp_path / "v.webm", times)
    cfg = ClipSamplingConfig(num_frames=9, target_fps=8.0, clips_per_video=3, height=32, width=32)
    info = probe_video(path)
    for plan in plan_clips(info, cfg):
        assert clip_at(info, cfg, plan.start_frame, 0) == plan
    steady = probe_video(write_timed_video(tmp_path / "steady.webm", list(range(0, 3000, 100)), declared_fps=10))
    with pytest.raises(VideoUnusable, match="constant-rate now"):
        clip_at(steady, cfg, 0, 0)
