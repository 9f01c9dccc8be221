"""Synthetic corpus: real files that DALI decodes on CPU, deterministic for a seed."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from data_prep.manifest import ManifestError, read_manifest
from data_prep.synth import class_style, make_corpus
from data_prep.video import ClipPlan, DaliClipDecoder, VideoUnusable, probe_video


def digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((root / "videos").iterdir())}


@pytest.mark.parametrize("codec", ["vp9", "mjpeg"])
def test_corpus_decodes_with_dali_on_cpu(tmp_path, codec):
    manifest = make_corpus(tmp_path, num=4, classes=2, codec=codec, frames=9, size=(48, 64), seed=3)
    records = read_manifest(manifest)
    assert [r.label for r in records] == [0, 1, 0, 1]
    assert records[1].caption == class_style(1).caption
    plans = []
    for r in records:
        info = probe_video(r.path)
        assert (info.num_frames, info.height, info.width, info.codec) == (9, 48, 64, codec)
        plans.append(ClipPlan(path=r.path, start_frame=0, stride=1, num_frames=9))
    decoder = DaliClipDecoder(height=48, width=64, device="cpu", batch_size=3)
    clips = decoder.decode(plans)
    assert all(isinstance(c, torch.Tensor) and c.shape == (9, 48, 64, 3) and c.dtype == torch.uint8
               for c in clips)
    # the shape is drawn in the class colour on a dark background: the brightest pixels carry it
    assert all(c.float().amax() > 150 for c in clips)
    # videos of the same class differ (per-video RNG), and frames move
    assert not torch.equal(clips[0], clips[2])
    assert not torch.equal(clips[0][0], clips[0][-1])


def test_same_seed_gives_identical_files(tmp_path):
    for codec in ("vp9", "mjpeg"):
        a = make_corpus(tmp_path / f"a_{codec}", num=3, classes=3, codec=codec, seed=7).parent
        b = make_corpus(tmp_path / f"b_{codec}", num=3, classes=3, codec=codec, seed=7).parent
        c = make_corpus(tmp_path / f"c_{codec}", num=3, classes=3, codec=codec, seed=8).parent
        assert digests(a) == digests(b)
        assert digests(a) != digests(c)


def test_h264_is_rejected_on_cpu_with_the_codec_named(tmp_path):
    manifest = make_corpus(tmp_path, num=1, classes=1, codec="h264", seed=0)
    with pytest.raises(VideoUnusable, match="codec 'h264' cannot be decoded by DALI on CPU"):
        probe_video(read_manifest(manifest)[0].path, device="cpu")


def test_bad_manifest_rows_name_line_and_column(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("path,lable\nx.webm,1\n")
    with pytest.raises(ManifestError, match="unknown column.*lable"):
        read_manifest(bad)
    bad.write_text("path,label\nx.webm,one\n")
    with pytest.raises(ManifestError, match=r"m.csv:2: column 'label' must be an integer"):
        read_manifest(bad)
