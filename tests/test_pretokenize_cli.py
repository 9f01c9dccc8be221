"""`videoar pretokenize` / `videoar shards` end to end on CPU, and the shipped recipes' sizes."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from data_prep.pretokenize.config import PretokenizeConfig
from tests.pretok_helpers import make_clean_corpus, make_tiny_tokenizer
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
    with pytest.raises(SystemExit, match="'num_frames' is 9 in the shard manifest but 17"):
        videoar(args + ["--set", "clips.num_frames=17"])
    with pytest.raises(SystemExit, match="unknown key 'clip'"):
        videoar(args + ["--set", "clip.height=64"])
    assert videoar(["shards", "merge", str(out)]) == 0
