"""`videoar pretokenize` / `videoar shards` end to end on CPU, and the shipped recipes' sizes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.pretokenize.config import PretokenizeConfig
from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer, tree_bytes
from tests.subprocess_env import child_env
from videoar_megatron.cli import main as videoar
from videoar_common.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "pretokenize"


@pytest.mark.parametrize("name, frames, hw, latent_hw, tokens", [
    ("tiny.yaml", 9, (32, 32), (2, 2), None),
    ("ucf101_17x128.yaml", 17, (128, 128), (8, 8), 130),
    ("stage3_33x384x672.yaml", 33, (384, 672), (24, 42), None),
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
    with pytest.raises(SystemExit, match="'num_frames' is 9 in the shard manifest but 17"):
        videoar(args + ["--set", "clips.num_frames=17"])
    with pytest.raises(SystemExit, match="unknown key 'clip'"):
        videoar(args + ["--set", "clip.height=64"])
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
