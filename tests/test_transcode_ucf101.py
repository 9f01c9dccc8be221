"""UCF-101 manifests from the official layout, and `videoar transcode` (parallel, resumable) turning
MPEG-4 Part 2 AVI files (what UCF-101 ships) into VP9 that DALI decodes on CPU, end to end into shards."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from data_prep.manifest import ManifestError, read_manifest
from data_prep.synth import render_video
from data_prep.transcode import REJECTS_FILE, transcode_manifest
from data_prep.ucf101 import build_ucf101_manifest, class_caption
from data_prep.video import ClipPlan, PyAVClipDecoder, VideoUnusable, probe_video
from tests.frame_checks import assert_same_frames
from tests.pretok_helpers import make_tiny_tokenizer, pretok_config, pretokenizer
from videoar_megatron.cli import main as videoar

CLASSES = ["ApplyEyeMakeup", "HandstandPushups", "YoYo"]
FOLDERS = ["ApplyEyeMakeup", "HandStandPushups", "YoYo"]  # the official tree spells one folder differently


def write_mpeg4_avi(path: Path, label: int, seed: int, frames: int = 12, size=(48, 64)) -> None:
    """An MPEG-4 Part 2 (xvid-like) AVI, as UCF-101 ships, via PyAV's built-in mpeg4 encoder."""
    import av
    path.parent.mkdir(parents=True, exist_ok=True)
    video = render_video(label, frames, size, np.random.default_rng(seed))
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = size[1], size[0], "yuv420p"
        for f in video:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


@pytest.fixture(scope="module")
def ucf(tmp_path_factory):
    """A 3-class UCF-101 look-alike: 2 groups per class; group 1 is the test set of split 1."""
    root = tmp_path_factory.mktemp("ucf")
    videos, lists = root / "UCF-101", root / "ucfTrainTestlist"
    lists.mkdir()
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(CLASSES)))
    train, test = [], []
    for label, folder in enumerate(FOLDERS):
        for g in (1, 2):
            rel = f"{folder}/v_{folder}_g{g:02d}_c01.avi"
            write_mpeg4_avi(videos / rel, label, seed=10 * label + g)
            (test if g == 1 else train).append(rel)
    (lists / "trainlist01.txt").write_text("".join(f"{r} {FOLDERS.index(r.split('/')[0]) + 1}\n" for r in train))
    (lists / "testlist01.txt").write_text("".join(f"{r}\n" for r in test))
    return root


def test_ucf101_manifest_from_official_layout(ucf, tmp_path):
    out = tmp_path / "manifests" / "train1.csv"
    path, rows, missing = build_ucf101_manifest(ucf / "UCF-101", ucf / "ucfTrainTestlist", out, split=1, subset="train")
    records = read_manifest(path)
    assert (rows, missing) == (3, 0)
    assert [r.label for r in records] == [0, 1, 2]
    assert [r.caption for r in records] == ["apply eye makeup", "handstand pushups", "yo yo"]
    assert all(Path(r.path).is_file() and "_g02_" in r.path for r in records)
    assert not Path(next(csv.DictReader(open(out)))["path"]).is_absolute()  # portable: relative paths
    _, rows_all, _ = build_ucf101_manifest(ucf / "UCF-101", ucf / "ucfTrainTestlist", tmp_path / "all.jsonl",
                                           subset="all")
    assert rows_all == 6
    assert class_caption("PlayingDaf") == "playing daf"


def test_ucf101_label_disagreeing_with_folder_names_the_line(ucf, tmp_path):
    bad = tmp_path / "lists"
    bad.mkdir()
    (bad / "classInd.txt").write_text((ucf / "ucfTrainTestlist" / "classInd.txt").read_text())
    (bad / "trainlist01.txt").write_text("YoYo/v_YoYo_g02_c01.avi 1\n")
    with pytest.raises(ManifestError, match=r"trainlist01.txt:1: label 1 disagrees with folder 'YoYo'"):
        build_ucf101_manifest(ucf / "UCF-101", bad, tmp_path / "m.csv")


def test_transcode_makes_mpeg4_decodable_on_cpu_resumably_and_into_shards(ucf, tmp_path):
    manifest, _, _ = build_ucf101_manifest(ucf / "UCF-101", ucf / "ucfTrainTestlist", tmp_path / "src" / "train.csv")
    original = read_manifest(manifest)
    with pytest.raises(VideoUnusable, match="codec 'mpeg4' cannot be decoded by DALI on CPU"):
        probe_video(original[0].path, device="cpu")
    # one corrupt file among them: a reject with its reason, not a crash
    broken = ucf / "UCF-101" / "YoYo" / "v_YoYo_g02_c01.avi"
    data = broken.read_bytes()
    broken.write_bytes(b"\0" * 4096)
    try:
        out = tmp_path / "vp9"
        new_manifest, results = transcode_manifest(manifest, out, workers=2)
    finally:
        broken.write_bytes(data)
    assert [r.status for r in results] == ["transcoded", "transcoded", "failed"]
    assert "v_YoYo_g02_c01.avi" in (out / REJECTS_FILE).read_text()
    records = read_manifest(new_manifest)
    assert len(records) == 2 and all(r.path.endswith(".webm") for r in records)
    for src, dst in zip(original, records):
        info = probe_video(dst.path, device="cpu")
        assert (info.codec, info.num_frames, info.height, info.width) == ("vp9", 12, 48, 64)
        plan = ClipPlan(path=src.path, start_frame=0, stride=1, num_frames=12)
        a = PyAVClipDecoder(height=48, width=64).decode([plan])[0]
        b = PyAVClipDecoder(height=48, width=64).decode([ClipPlan(**{**plan.__dict__, "path": dst.path})])[0]
        assert_same_frames(b, a, tol=4.0)  # same frames in the same order, re-encoded
    mtimes = [Path(r.path).stat().st_mtime_ns for r in records]
    _, again = transcode_manifest(manifest, out, workers=1)  # resumable: existing outputs are skipped
    assert [r.status for r in again] == ["skipped", "skipped", "transcoded"]
    assert [Path(r.path).stat().st_mtime_ns for r in records] == mtimes
    # the transcoded corpus pre-tokenizes on CPU with nothing rejected
    tok = make_tiny_tokenizer(tmp_path / "tok")
    shard_dir = tmp_path / "shards"
    pretokenizer(pretok_config(tok, new_manifest, shard_dir, num_partitions=1, clips={"clips_per_video": 1})).run()
    assert (shard_dir / "rejects.jsonl").read_text() == ""
    assert "samples" in (shard_dir / "COMMITTED").read_text()


def test_transcode_and_manifest_cli(ucf, tmp_path, capsys):
    m = tmp_path / "test1.csv"
    assert videoar(["manifest", "ucf101", "--root", str(ucf / "UCF-101"), "--splits",
                    str(ucf / "ucfTrainTestlist"), "--subset", "test", "--out", str(m)]) == 0
    assert videoar(["transcode", "--manifest", str(m), "--out", str(tmp_path / "t"), "--workers", "1",
                    "--target-device", "gpu"]) == 0  # NVDEC decodes mpeg4: everything is kept
    out = capsys.readouterr().out
    assert "kept 3" in out
    assert [r.path for r in read_manifest(tmp_path / "t" / "test1.csv")] == [r.path for r in read_manifest(m)]
