"""Training clip streams: deterministic per-rank shards, exact resume, images, rejects (never zeros)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.clip_dataset import (ClipStream, ImageSource, NoUsableData, RejectLog, VideoSource, eval_batches,
                                    read_sources)
from data_prep.manifest import VideoRecord
from data_prep.synth import encode_video, make_corpus, render_video
from data_prep.video import ClipSamplingConfig

CLIP = ClipSamplingConfig(num_frames=5, height=16, width=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    make_corpus(root, num=6, classes=3, frames=9, size=(16, 16), seed=0)
    return root


def stream(records, rank=0, world=1, batch=2, rejects=None, source=None):
    return ClipStream(records, source or VideoSource(CLIP), batch_size=batch, rank=rank, world_size=world, seed=3,
                      rejects=rejects)


def test_ranks_read_disjoint_shards_and_clips_are_real(corpus):
    records = read_sources(corpus / "metadata.csv")
    seen = []
    for rank in range(2):
        s = stream(records, rank=rank, world=2, batch=3)
        ids = s.next_batch().sample_ids  # one epoch: 3 videos per rank
        seen.append({i.split("@")[0] for i in ids})
    assert not seen[0] & seen[1] and len(seen[0] | seen[1]) == 6
    batch = stream(records).next_batch()
    assert batch.video_BCTHW.shape == (2, 3, 5, 16, 16)
    assert batch.video_BCTHW.min() >= -1 and batch.video_BCTHW.max() <= 1
    assert (batch.video_BCTHW.flatten(1).std(1) > 0.05).all()  # real frames, not a constant fill


def test_resume_from_a_saved_position_gives_the_same_batches(corpus):
    records = read_sources(corpus / "metadata.csv")
    a = stream(records)
    for _ in range(4):  # past an epoch boundary (6 videos, 2 per batch)
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # survives JSON too
    expected = [a.next_batch() for _ in range(3)]
    b = stream(records)
    b.load_state_dict(state)
    for want in expected:
        got = b.next_batch()
        assert got.sample_ids == want.sample_ids
        assert torch.equal(got.video_BCTHW, want.video_BCTHW)
    with pytest.raises(ValueError, match="world_size was 1 when saved and is 2 now"):
        stream(records, world=2).load_state_dict(state)


def test_unusable_videos_are_logged_and_skipped_never_zeros(tmp_path, corpus):
    good = read_sources(corpus / "metadata.csv")[:2]
    (tmp_path / "garbage.webm").write_bytes(b"\x00" * 4096)
    frames = render_video(0, 9, (16, 16), np.random.default_rng(0))
    encode_video(frames, tmp_path / "h264.mp4", "h264", fps=8)
    encode_video(frames[:3], tmp_path / "short.webm", "vp9", fps=8)
    bad = [VideoRecord(path=str(tmp_path / n), label=0) for n in ("garbage.webm", "missing.webm", "h264.mp4",
                                                                   "short.webm")]
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    s = stream(bad[:2] + [good[0]] + bad[2:] + [good[1]], rejects=rejects)
    for _ in range(4):
        batch = s.next_batch()
        assert {Path(i.split("@")[0]).name for i in batch.sample_ids} <= {Path(g.path).name for g in good}
        assert (batch.video_BCTHW.flatten(1).std(1) > 0.05).all()
    reasons = {Path(r["path"]).name: r["reason"] for r in map(json.loads, rejects.path.read_text().splitlines())}
    assert "unreadable container" in reasons["garbage.webm"]
    assert "missing file" in reasons["missing.webm"]
    assert "codec 'h264' cannot be decoded by DALI on CPU" in reasons["h264.mp4"]
    assert "too short" in reasons["short.webm"]
    assert len(rejects.path.read_text().splitlines()) == 4  # each logged once
    assert set(s.state_dict()["bad"]) == {r.path for r in bad}


def test_all_unusable_is_a_clear_error(tmp_path):
    bad = [VideoRecord(path=str(tmp_path / f"missing{i}.webm"), label=0) for i in range(3)]
    with pytest.raises(NoUsableData, match=r"no usable video among the 3 sources.*missing file"):
        stream(bad).next_batch()
    with pytest.raises(NoUsableData, match="no usable held-out clip"):
        list(eval_batches(bad, VideoSource(CLIP), batch_size=2, limit=4))


def test_images_are_one_frame_clips(tmp_path):
    from PIL import Image
    frames = render_video(1, 3, (24, 40), np.random.default_rng(0))
    paths = []
    for i, f in enumerate(frames):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(f).save(paths[-1])
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "list.txt").write_text("# images\n" + "\n".join(p.name for p in paths) + "\nbroken.png\n")
    records = read_sources(tmp_path / "list.txt")
    rejects = RejectLog(tmp_path / "rejects.jsonl")
    s = ClipStream(records, ImageSource(16, 16), batch_size=4, seed=0, name="image", rejects=rejects)
    batch = s.next_batch()
    assert batch.video_BCTHW.shape == (4, 3, 1, 16, 16)
    assert all("broken" not in i for i in batch.sample_ids)
    assert "unreadable image" in rejects.path.read_text()


def test_eval_batches_are_deterministic_centre_clips(corpus):
    records = read_sources(corpus / "metadata.csv")
    runs = [list(eval_batches(records, VideoSource(CLIP), batch_size=4, limit=5)) for _ in range(2)]
    assert [b.video_BCTHW.shape[0] for b in runs[0]] == [4, 1]
    assert [b.sample_ids for b in runs[0]] == [b.sample_ids for b in runs[1]]
    assert all(i.endswith("@2") for b in runs[0] for i in b.sample_ids)  # 9 frames, 5-frame clip → start 2
