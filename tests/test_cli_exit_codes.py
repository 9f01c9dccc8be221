"""One exit-code rule for every ``videoar`` subcommand (README, Troubleshooting): a missing or invalid
input (recipe, path, checkpoint, tokenizer, shard set, manifest) exits 2 with ONE line on stderr that
names the path or knob, and no traceback. Tested command by command, in process (an exception that
escapes the dispatcher fails the test) and once through a real ``python -m videoar_megatron.cli``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sample_helpers import model_config, write_ar_checkpoint, write_tokenizer
from subprocess_env import child_env
from videoar_common.exit_codes import EXIT_CONFIG
from videoar_megatron.cli import SUBCOMMANDS
from videoar_megatron.cli import main as videoar

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
MISSING = "/nonexistent/videoar-test-input"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A committed tokenizer and AR checkpoint, so each case can break exactly one input."""
    from videoar_common.distributed import init_distributed
    from videoar_megatron.model.config import ParallelConfig
    from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
    root = tmp_path_factory.mktemp("exit_codes")
    digest = write_tokenizer(root / "tokenizer")
    ctx = init_distributed(device="cpu")
    groups = init_model_parallel(ctx, ParallelConfig())
    write_ar_checkpoint(root / "ar", 10, model_config(), digest, ctx, groups)
    destroy_model_parallel(ctx)
    (root / "a_file").write_text("not a directory\n")
    (root / "manifest.csv").write_text("path,caption,label\nvideos/none.webm,none,0\n")
    return root


# (case id, argv with {a} = assets dir and {t} = a fresh output dir, text the one line must contain)
CASES = [
    ("demo", ["demo", "--out", "{a}/a_file"], "{a}/a_file"),
    ("synth", ["synth", "--out", "{t}/corpus", "--num", "0"], "--num"),
    ("pretokenize-recipe", ["pretokenize", "--recipe", MISSING], MISSING),
    ("pretokenize-tokenizer", ["pretokenize", "--recipe", str(RECIPES / "pretokenize/tiny.yaml"),
                               "--set", f"tokenizer={MISSING}", "--set", "input_manifest={a}/manifest.csv",
                               "--set", "output_dir={t}/shards"], MISSING),
    ("pretokenize-manifest", ["pretokenize", "--recipe", str(RECIPES / "pretokenize/tiny.yaml"),
                              "--set", "tokenizer={a}/tokenizer", "--set", f"input_manifest={MISSING}",
                              "--set", "output_dir={t}/shards"], MISSING),
    ("shards-inspect", ["shards", "inspect", MISSING], MISSING),
    ("shards-merge", ["shards", "merge", MISSING], MISSING),
    ("transcode", ["transcode", "--manifest", MISSING, "--out", "{t}/tc"], MISSING),
    ("manifest", ["manifest", "ucf101", "--root", MISSING, "--splits", MISSING, "--out", "{t}/ucf.csv"], MISSING),
    ("sample-ckpt", ["sample", "--ckpt", MISSING, "--tokenizer", "{a}/tokenizer", "--class", "0",
                     "--out", "{t}/s"], MISSING),
    ("sample-tokenizer", ["sample", "--ckpt", "{a}/ar", "--tokenizer", MISSING, "--class", "0",
                          "--out", "{t}/s"], MISSING),
    ("sample-recipe", ["sample", "--ckpt", "{a}/ar", "--tokenizer", "{a}/tokenizer", "--recipe", MISSING,
                       "--class", "0", "--out", "{t}/s"], MISSING),
    ("eval-fvd-ckpt", ["eval", "fvd", "--recipe", str(RECIPES / "eval/tiny.yaml"), "--checkpoint", MISSING,
                       "--tokenizer", "{a}/tokenizer", "--sample-recipe", str(RECIPES / "sample/tiny.yaml"),
                       "--out", "{t}/fvd"], MISSING),
    ("eval-fvd-sample-recipe", ["eval", "fvd", "--recipe", str(RECIPES / "eval/tiny.yaml"), "--checkpoint",
                                "{a}/ar", "--tokenizer", "{a}/tokenizer", "--sample-recipe", MISSING,
                                "--out", "{t}/fvd"], MISSING),
    ("eval-rfvd-tokenizer", ["eval", "rfvd", "--recipe", str(RECIPES / "eval/tiny.yaml"), "--tokenizer", MISSING,
                             "--out", "{t}/rfvd"], MISSING),
    ("train-recipe", ["train", "--recipe", MISSING], MISSING),
    ("train-shards", ["train", "--recipe", str(RECIPES / "ar/tiny.yaml"), "--set", f"data.path={MISSING}",
                      "--run-dir", "{t}/ar"], MISSING),
    ("tokenizer-train-recipe", ["tokenizer", "train", "--recipe", MISSING, "--run-dir", "{t}/tok"], MISSING),
    ("tokenizer-train-manifest", ["tokenizer", "train", "--recipe", str(RECIPES / "tokenizer/tiny.yaml"),
                                  "--set", "init.from_recipe=", "--set", "init.reinflate=false",
                                  "--set", "data.synth.enabled=false",
                                  "--set", f"data.manifest={MISSING}", "--run-dir", "{t}/tok"], MISSING),
    ("tokenizer-eval-run", ["tokenizer", "eval", "--run", MISSING], MISSING),
    ("tokenizer-eval-tokenizer", ["tokenizer", "eval", "--tokenizer", MISSING, "--manifest", "{a}/manifest.csv",
                                  "--out", "{t}/te"], MISSING),
    ("tokenizer-eval-manifest", ["tokenizer", "eval", "--tokenizer", "{a}/tokenizer", "--manifest", MISSING,
                                 "--out", "{t}/te"], MISSING),
    ("tokenizer-inflate", ["tokenizer", "inflate", "--image-ckpt", MISSING, "--recipe",
                           str(RECIPES / "tokenizer/tiny.yaml"), "--out", "{t}/inflated"], MISSING),
]


def test_every_subcommand_has_a_case():
    assert {argv[0] for _, argv, _ in CASES} == set(SUBCOMMANDS)


def _fill(items, assets: Path, tmp: Path) -> list[str]:
    return [s.replace("{a}", str(assets)).replace("{t}", str(tmp)) for s in items]


@pytest.mark.parametrize("argv, named", [(argv, named) for _, argv, named in CASES],
                         ids=[case for case, _, _ in CASES])
def test_bad_input_exits_2_with_one_line_naming_it(argv, named, assets, tmp_path, capsys):
    argv = _fill(argv, assets, tmp_path)
    [named] = _fill([named], assets, tmp_path)
    code = videoar(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == EXIT_CONFIG, (code, err)
    assert len(lines) == 1 and named in lines[0], err
    assert lines[0].startswith(f"videoar {argv[0]}"), err


def test_refusal_reaches_the_shell_as_2_without_traceback(assets, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "videoar_megatron.cli", "sample", "--ckpt", MISSING,
                           "--tokenizer", str(assets / "tokenizer"), "--class", "0", "--out", str(tmp_path)],
                          capture_output=True, text=True, env=child_env(), cwd=REPO, timeout=300)
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    assert "Traceback" not in proc.stderr and MISSING in proc.stderr, proc.stderr
