"""`videoar pretokenize` / `videoar shards` end to end on CPU, and the shipped recipes' sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.pretokenize.config import PretokenizeConfig
from cli_helpers import assert_refused
from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer, tree_bytes
from tests.subprocess_env import child_env
from videoar_megatron.cli import main as videoar
from videoar_common.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretokenize"


@pytest.mark.parametrize("name, frames, hw, latent_hw, tokens", [
    ("tiny.yaml", 9, (32, 32), (2, 2), None),
    ("ucf101_17x128.yaml", 17, (128, 128), (8, 8), 130),
    ("stage3_33x384x672.yaml", 33, (384, 672), (24, 42), None),
    ("stage3_65x384x672.yaml", 65, (384, 672), (24, 42), None),
    ("stage3_129x384x672.yaml", 129, (384, 672), (24, 42), None),
])
def test_shipped_recipes_parse_and_fit_together(name, frames, hw, latent_hw, tokens):
    cfg = load_config(PretokenizeConfig, RECIPES / name)
    assert cfg.clips.num_frames == frames and (cfg.clips.height, cfg.clips.width) == hw
    assert (cfg.clips.num_frames - 1) % 4 == 0  # 1 + 4k for the causal tokenizer
    if cfg.scale_schedule:
        assert tuple(cfg.scale_schedule[-1]) == latent_hw
    if tokens:
        assert sum(h * w for h, w in cfg.scale_schedule) == tokens
        assert 1 + (frames - 1) // 4 == 5  # UCF-101: 5 latent frames of 8x8, 650 tokens


def test_cli_runs_the_tiny_recipe_and_inspects_it(tmp_path, capsys):
    corpus = make_clean_corpus(tmp_path / "corpus", num=3)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    out = tmp_path / "shards"
    sets = [f"tokenizer={tok}", f"input_manifest={corpus}", f"output_dir={out}", "progress_bar=false"]
    args = ["pretokenize", "--recipe", str(RECIPES / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]
    assert videoar(args) == 0
    assert (out / "COMMITTED").is_file() and json.loads((out / "COMMITTED").read_text())["samples"] == 6
    assert videoar(args) == 0  # a rerun finds everything committed
    assert videoar(["shards", "inspect", str(out), "--tokenizer", str(tok), "--samples", "2"]) == 0
    text = capsys.readouterr().out
    assert "samples 6 in 2 shards" in text and "rejects 0" in text
    png = out / "logs" / "inspect.png"
    assert png.is_file() and png.stat().st_size > 10_000
    assert_refused(capsys, videoar(args + ["--set", "clips.num_frames=17"]),
                   "'num_frames' is 9 in the shard manifest but 17")
    assert_refused(capsys, videoar(args + ["--set", "clip.height=64"]), "unknown key 'clip'")
    assert videoar(["shards", "merge", str(out)]) == 0


@pytest.mark.slow  # a CLI process that spawns a decode process: imports twice
def test_decode_process_from_the_module_entrypoint_writes_the_in_process_shards(tmp_path):
    """`python -m videoar_megatron.cli pretokenize` with decode_process: the spawned decode process imports
    the entrypoint's main module again without running it (spawn skips a `.__main__` module), decodes
    (the partition log says so), and the shards equal an in-process run's."""
    corpus = make_clean_corpus(tmp_path / "corpus", num=3)
    tok = make_tiny_tokenizer(tmp_path / "tok")
    here, there = tmp_path / "here", tmp_path / "there"
    sets = [f"tokenizer={tok}", f"input_manifest={corpus}", "progress_bar=false"]
    args = ["pretokenize", "--recipe", str(RECIPES / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]
    assert videoar(args + ["--set", f"output_dir={here}"]) == 0
    cmd = [sys.executable, "-m", "videoar_megatron.cli", *args, "--set", f"output_dir={there}",
           "--set", "decode_process=true"]
    done = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    logs = [json.loads(f.read_text()) for f in (there / "logs").glob("part-*.json")]
    assert logs and all(log["decode_process"] for log in logs)
    assert tree_bytes(there) == tree_bytes(here)


def test_a_run_that_keeps_no_clip_exits_2_with_the_reject_summary(tmp_path, capsys):
    """Every manifest row rejected (12-frame videos, 17-frame clips): exit 2 naming the reject kinds;
    one missing row among good ones is a partly rejected run and stays exit 0."""
    import csv
    tok = make_tiny_tokenizer(tmp_path / "tok")
    corpus = make_clean_corpus(tmp_path / "corpus", num=3)
    rows = list(csv.DictReader(open(corpus)))
    partly = tmp_path / "corpus" / "partly.csv"
    with open(partly, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows([*rows, {**rows[0], "path": "videos/does_not_exist.webm"}])

    def run(manifest, out, *sets):
        sets = [f"tokenizer={tok}", f"input_manifest={manifest}", f"output_dir={out}", "progress_bar=false", *sets]
        return videoar(["pretokenize", "--recipe", str(RECIPES / "tiny.yaml")] + [a for s in sets for a in ("--set", s)])

    assert run(partly, tmp_path / "partly") == 0
    assert json.loads((tmp_path / "partly" / "COMMITTED").read_text())["rejects"] == 1
    capsys.readouterr()
    line = assert_refused(capsys, run(corpus, tmp_path / "none", "clips.num_frames=17"),
                          r"no clip was kept: every video of input_manifest=.* was rejected \(3 rejects: too_short 3")
    assert "rejects.jsonl" in line and str(corpus) in line, line
    # a rerun finds the (empty) shard set committed and still says so, as does the merge job of an array
    assert_refused(capsys, run(corpus, tmp_path / "none", "clips.num_frames=17"), "too_short 3")
    sets = [f"tokenizer={tok}", f"input_manifest={corpus}", f"output_dir={tmp_path / 'none'}", "clips.num_frames=17"]
    code = videoar(["pretokenize", "--recipe", str(RECIPES / "tiny.yaml"), "--merge-only"]
                   + [a for s in sets for a in ("--set", s)])
    assert_refused(capsys, code, "no clip was kept.*too_short 3")


def test_inspect_decodes_the_bits_and_checks_the_latent_against_them(tmp_path):
    """Issue 23: the PNG's "from latent" row decoded the continuous latent, an input the decoder never
    sees (it is trained on sums of binary codes; after all scales the residual still holds most of the
    latent's norm), so colours came out wrong where the bits were right. The PNG shows the source and
    the bits' decode; the latent is checked by re-quantizing it, as the AR trainer uses it."""
    from data_prep import shard_inspect
    from data_prep.reader import decode_sample
    from data_prep.shards import read_shard_manifest
    from tokenizer import load_tokenizer
    tok_dir = make_tiny_tokenizer(tmp_path / "tok")
    corpus = make_clean_corpus(tmp_path / "corpus", num=2)
    out = tmp_path / "shards"
    sets = [f"tokenizer={tok_dir}", f"input_manifest={corpus}", f"output_dir={out}", "progress_bar=false"]
    assert videoar(["pretokenize", "--recipe", str(RECIPES / "tiny.yaml")] + [a for s in sets for a in ("--set", s)]) == 0
    tok, manifest = load_tokenizer(tok_dir), read_shard_manifest(out)
    q = tok.quantizer_for(manifest["scale_schedule"])
    raw = shard_inspect._read_raw_samples(out, 1)[0]
    s = decode_sample(raw, manifest)
    rows = shard_inspect.sample_rows(s, raw, manifest, tok, q, corpus.parent)
    assert [name for name, _ in rows] == ["source", "from bits"]
    assert rows[0][1].shape == rows[1][1].shape == (9, 32, 32, 3)
    assert shard_inspect.latent_bit_mismatches(s, q) == (0, s["bits"].numel())
    # one token of the stored latent pushed far to the other side of its finest-scale bits: they all flip
    H, W = s["latent"].shape[-2:]
    finest = s["bits"][0, s["bits"].shape[1] - H * W]             # frame 0, last scale, token (0, 0)
    s["latent"][0, :, 0, 0] = 1000.0 * (1 - 2 * finest.float())
    assert shard_inspect.latent_bit_mismatches(s, q)[0] >= finest.numel()
