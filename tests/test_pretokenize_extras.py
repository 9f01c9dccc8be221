"""Text features from a frozen local text encoder, the PyAV reference decoder against DALI, DALI frames
that do not depend on the decode pipeline count, the benchmark's CPU smoke run, and two torchrun workers
writing one shard set concurrently."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep import shards
from data_prep.manifest import read_manifest
from data_prep.synth import make_corpus
from data_prep.text_encoder import FrozenTextEncoder, TextEncoderConfig
from data_prep.video import ClipPlan, DaliClipDecoder, PyAVClipDecoder, VideoUnusable
from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer, pretok_config, pretokenizer, tree_bytes
from tests.test_pretokenize import read_all


def make_text_encoder(directory: Path, seed: int = 0) -> Path:
    """A tiny BERT and a word-level vocabulary saved like any Hugging Face model (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    directory.mkdir(parents=True)
    words = "a an red green blue yellow magenta cyan orange white circle square triangle diamond cross ring " \
            "moving right down left up clockwise counter - ".split()
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt")).save_pretrained(directory)
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=32)).save_pretrained(directory)
    return directory


def test_text_features_are_stored_padded_with_a_mask(tmp_path):
    corpus = make_clean_corpus(tmp_path / "corpus", num=2)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    enc_dir = make_text_encoder(tmp_path / "bert")
    text = TextEncoderConfig(path=str(enc_dir), max_length=12)
    out = tmp_path / "shards"
    pretokenizer(pretok_config(tok, corpus, out, num_partitions=1, text_encoder=text)).run()
    manifest = shards.read_shard_manifest(out)
    assert manifest["shapes"]["text_features"] == [12, 16] and manifest["text_encoder"]["max_length"] == 12
    reference = FrozenTextEncoder(text, torch.device("cpu"))
    samples = read_all(out)
    assert len(samples) == 4
    for s in samples:
        feats, mask = reference.encode([s["caption"]])
        assert s["text_features"].shape == (12, 16) and s["text_mask"].dtype == torch.bool
        assert torch.equal(s["text_features"], torch.from_numpy(feats[0].astype(np.float32)))
        n = int(s["text_mask"].sum())
        assert 3 < n < 12 and torch.all(s["text_features"][n:] == 0)
    other = make_text_encoder(tmp_path / "bert2", seed=1)
    with pytest.raises(shards.ShardManifestMismatch, match="'text_encoder'"):
        pretokenizer(pretok_config(tok, corpus, out, num_partitions=1,
                                   text_encoder=TextEncoderConfig(path=str(other), max_length=12))).run()


def test_pyav_reference_decoder_picks_the_same_frames_as_dali(tmp_path):
    records = read_manifest(make_clean_corpus(tmp_path, num=2))
    plans = [ClipPlan(path=r.path, start_frame=2, stride=2, num_frames=5) for r in records]
    for h, w in [(48, 64), (32, 32), (32, 48)]:
        dali = DaliClipDecoder(height=h, width=w, device="cpu").decode(plans)
        pyav = PyAVClipDecoder(height=h, width=w).decode(plans)
        for a, b in zip(dali, pyav):
            a, b = a.float(), b.float()
            assert a.shape == b.shape == (5, h, w, 3)
            same = (a - b).abs().mean().item()
            shifted = (a[1:] - b[:-1]).abs().mean().item()
            assert same < 2.5 and same < 0.6 * shifted  # colour conversion differs a little; frames match
    short = ClipPlan(path=records[0].path, start_frame=8, stride=2, num_frames=5)  # needs frame 16 of 12
    assert isinstance(PyAVClipDecoder(height=32, width=32).decode([short])[0], VideoUnusable)


def decoded(results) -> list:
    """Frames as they are, failures as (kind, reason): comparable with ``==`` slot by slot."""
    return [(r.kind, r.reason) if isinstance(r, VideoUnusable) else r for r in results]


def test_decoded_frames_do_not_depend_on_the_pipeline_count_or_on_grouping_clips_by_video(tmp_path):
    vp9 = read_manifest(make_corpus(tmp_path / "vp9", num=3, classes=2, codec="vp9", frames=12, size=(48, 64),
                                    fps=8, seed=1))
    mjpeg = read_manifest(make_corpus(tmp_path / "mjpeg", num=2, classes=2, codec="mjpeg", frames=12,
                                      size=(48, 64), fps=8, seed=2))
    garbage = tmp_path / "garbage.webm"  # an EBML magic and noise: DALI fails the whole pipeline run on it
    garbage.write_bytes(b"\x1aE\xdf\xa3" + bytes(range(256)) * 8)
    plans = [ClipPlan(path=r.path, start_frame=start, stride=stride, num_frames=5)
             for r in vp9 + mjpeg for start, stride in ((0, 1), (3, 2))]
    plans.insert(5, ClipPlan(path=str(garbage), start_frame=0, stride=1, num_frames=5))
    plans.insert(8, ClipPlan(path=vp9[0].path, start_frame=8, stride=2, num_frames=5))  # needs frame 16 of 12
    # 12 clips in batches of 5, 5 and 2; 2, 3 and 4 pipelines cut a batch of 5 into 3+2, 2+2+1 and 2+2+1
    reference = decoded(DaliClipDecoder(height=32, width=32, batch_size=5, num_threads=1, pipelines=1).decode(plans))
    kinds = [r[0] if isinstance(r, tuple) else "frames" for r in reference]
    assert kinds == ["frames"] * 5 + ["decode_error"] + ["frames"] * 2 + ["decode_error"] + ["frames"] * 3
    assert "Failed to create video decoder" in reference[5][1]  # the failing clip alone, with its reason
    assert "out-of-bounds frame index 12" in reference[8][1]
    assert not torch.equal(reference[0], reference[2])  # different videos: a reordering would show
    # pipelines=1 above decoded the clips of a video together (one DALI sample per video);
    # group_by_video=False decodes every clip on its own
    for pipelines, grouped in ((2, True), (3, True), (4, True), (1, False), (3, False)):
        got = decoded(DaliClipDecoder(height=32, width=32, batch_size=5, num_threads=1, pipelines=pipelines,
                                      group_by_video=grouped).decode(plans))
        assert len(got) == len(reference)
        for g, want in zip(got, reference):
            assert type(g) is type(want) and (torch.equal(g, want) if isinstance(g, torch.Tensor) else g == want)


def test_clips_of_one_video_decode_together_and_a_bad_clip_does_not_take_the_others(tmp_path):
    from data_prep.video import group_by_video
    (video,) = read_manifest(make_corpus(tmp_path / "v", num=1, classes=1, codec="vp9", frames=12, size=(48, 64),
                                         fps=8, seed=3))
    overlapping = [ClipPlan(path=video.path, start_frame=s, stride=st, num_frames=4) for s, st in ((0, 2), (3, 1), (5, 2))]
    (request,) = group_by_video(overlapping)
    assert request.frames == (0, 2, 3, 4, 5, 6, 7, 9, 11)  # each source frame once
    together = DaliClipDecoder(height=32, width=32, batch_size=8).decode(overlapping)
    alone = [DaliClipDecoder(height=32, width=32, batch_size=8).decode([p])[0] for p in overlapping]
    assert all(torch.equal(a, b) for a, b in zip(together, alone))
    assert torch.equal(together[0][2], together[1][1])  # frame 4 is in both clips
    pyav_together = PyAVClipDecoder(height=32, width=32).decode(overlapping)
    pyav_alone = [PyAVClipDecoder(height=32, width=32).decode([p])[0] for p in overlapping]
    assert all(torch.equal(a, b) for a, b in zip(pyav_together, pyav_alone))
    # frame 12 does not exist: the video's decode fails, its clips are redone one by one
    bad = ClipPlan(path=video.path, start_frame=6, stride=2, num_frames=4)
    got = DaliClipDecoder(height=32, width=32, batch_size=8).decode([overlapping[0], bad, overlapping[2]])
    assert torch.equal(got[0], alone[0]) and torch.equal(got[2], alone[2])
    assert isinstance(got[1], VideoUnusable) and "out-of-bounds frame index 12" in got[1].reason
    pyav = PyAVClipDecoder(height=32, width=32).decode([overlapping[0], bad, overlapping[2]])
    assert torch.equal(pyav[0], pyav_alone[0]) and torch.equal(pyav[2], pyav_alone[2])
    assert isinstance(pyav[1], VideoUnusable) and pyav[1].kind == "frame_count"


def test_benchmark_smoke_on_cpu(tmp_path, capsys):
    from benchmarks.bench_pretokenize import main
    out = tmp_path / "bench.json"
    assert main(["--preset", "tiny-multi", "--device", "cpu", "--clips", "8", "--unique-videos", "2", "--base-channels", "8",
                 "--res-blocks", "1", "--latent-dim", "8", "--encoder-iters", "1", "--decode-pipelines", "1,2",
                 "--full", "each", "--encoder-micro-batch", "0,2", "--cpu-mix", "1:1", "--cpu-workers", "2",
                 "--profile-encoder", "--profile-batches", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    assert set(r["decode_only_clips_per_s"]) == {"1", "2"} and r["decode_only_clip_by_clip_clips_per_s"] > 0
    assert r["clips_per_video"] == 2 and r["shards_written"]
    fmt = r["encoder_memory_format"]
    assert set(r["encoder_only"]) == {"contiguous", "channels_last", f"{fmt}, 2-clip launches"}
    assert set(r["decode_beside_busy_encoder"]) == {"whole-batch launches", "2-clip launches"}
    assert all(x["decode_alone_clips_per_s"] > 0 for x in r["decode_beside_busy_encoder"].values())
    # DALI x 2 pipeline counts x 2 encoder setups, the CPU mix, the PyAV baseline last
    assert list(r["full_runs"]) == ["DALI cpu x1, whole-batch launches", "DALI cpu x1, 2-clip launches",
                                    "DALI cpu x2, whole-batch launches", "DALI cpu x2, 2-clip launches",
                                    "DALI cpu x1 + PyAV x1, whole-batch launches", "PyAV x2, whole-batch launches"]
    for label, run in r["full_runs"].items():
        assert run["clips"] == 8 and run["rejects"] == 0 and run["host_cores_busy"] > 0
        ceiling = r["encoder_only"][f"{fmt}, 2-clip launches" if "2-clip" in label else fmt]
        assert run["encoder_only_clips_per_s"] == ceiling
        assert run["fraction_of_encoder_only"] == round(run["clips_per_s"] / ceiling, 3)
        assert run["vs_pyav"] == round(run["clips_per_s"] / r["pyav_cpu"]["clips_per_s"], 2)
    assert r["fraction_of_encoder_only"] == r["full_runs"][r["best_full_run"]]["fraction_of_encoder_only"]
    profile = r["encoder_profile"]
    assert set(profile["ms_per_batch_by_phase"]) >= {"encoder", "quantizer"}
    assert profile["encoder_phase_ms_per_batch_by_category"]["conv / GEMM"] > 0
    summary = capsys.readouterr().out.split("-- tiny-multi summary --")[1]
    headline, columns = summary.strip().splitlines()[:2]  # the ratio to the encoder alone first
    figures = headline.split(": ", 1)[1]
    assert headline.startswith(f"HEADLINE {r['best_full_run']}: ")
    assert figures.index("of the encoder alone") < figures.index("the PyAV baseline") < figures.index("host cores busy")
    assert columns.split()[-6:] == ["/encoder", "/PyAV", "cores", "clips/s", "waited", "s"]


def test_benchmark_smoke_of_the_decode_process_on_cpu(tmp_path):
    """--beside-decode thread,process and --decode-process both: decode beside the busy encoder from decoder
    lanes in this process and in a decode process (each with its own decode-alone rate), and full runs
    with the decoders in either place at two --prefetch-batches depths (each run's config has its
    depth); all clips decoded and written."""
    from benchmarks.bench_pretokenize import main
    out = tmp_path / "bench.json"
    assert main(["--preset", "tiny", "--device", "cpu", "--clips", "8", "--unique-videos", "2", "--base-channels", "8",
                 "--res-blocks", "1", "--latent-dim", "8", "--encoder-iters", "1", "--decode-pipelines", "1",
                 "--encoder-memory-format", "contiguous", "--decode-process", "both", "--beside-decode", "thread,process",
                 "--prefetch-batches", "1,3", "--cpu-workers", "1", "--out", str(out)]) == 0
    (r,) = json.loads(out.read_text())["results"]
    beside = r["decode_beside_busy_encoder"]
    assert list(beside) == ["whole-batch launches", "whole-batch launches, decode in a separate process"]
    for x in beside.values():
        assert x["decode_alone_clips_per_s"] > 0 and x["decode_clips_per_s"] > 0 and x["encoder_clips_per_s"] > 0
    assert list(r["full_runs"]) == ["DALI cpu x1, whole-batch launches, prefetch 1",
                                    "DALI cpu x1, whole-batch launches, prefetch 3",
                                    "DALI cpu x1 in a decode process, whole-batch launches, prefetch 1",
                                    "DALI cpu x1 in a decode process, whole-batch launches, prefetch 3",
                                    "PyAV x1, whole-batch launches"]
    for label, run in r["full_runs"].items():
        assert run["clips"] == 8 and run["rejects"] == 0 and run["host_cores_busy"] > 0
        assert run["prefetch_batches"] == (int(label[-1]) if "prefetch" in label else 2)


def test_two_torchrun_workers_write_the_same_shards_as_one_process(tmp_path, torchrun):
    corpus = make_clean_corpus(tmp_path / "corpus", num=4)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    single = tmp_path / "single"
    pretokenizer(pretok_config(tok, corpus, single, num_partitions=2)).run()
    script = Path(__file__).parent / "dist_scripts" / "pretokenize_workers.py"
    both = tmp_path / "both"
    torchrun(script, 2, str(tok), str(corpus), str(both), timeout=300)
    assert tree_bytes(both) == tree_bytes(single)
    logs = sorted(p.name for p in (both / "logs").glob("part-*.json"))
    assert logs == ["part-00000-of-00002.json", "part-00001-of-00002.json"]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_manifest_round_trips_caption_only_and_labelled_rows(tmp_path, suffix):
    from data_prep.manifest import VideoRecord, write_manifest
    records = [VideoRecord(path=str(tmp_path / "a.webm"), caption="a dog runs"),
               VideoRecord(path=str(tmp_path / "b.webm"), label=3, start=1.5, end=4.0, fps=25.0)]
    assert read_manifest(write_manifest(tmp_path / f"m{suffix}", records)) == records
