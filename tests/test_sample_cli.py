"""``videoar sample`` end to end on CPU: a tokenizer directory and the checkpoints of a real tiny training
run (tests/sample_helpers.train_tiny_run) → mp4s, grid.gif, frames.png, index.json; seeds; V2V/I2V;
refusals."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from cli_helpers import assert_refused
from sample_helpers import LATENT_FRAMES, TRAINED_STEPS, model_config, write_ar_checkpoint, write_tokenizer
from videoar_megatron.cli import main as videoar
from videoar_common.distributed import init_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.sampling.video_io import write_mp4

TINY = Path(__file__).resolve().parents[1] / "recipes" / "sample" / "tiny.yaml"
WINDOW = 1 + 4 * (LATENT_FRAMES - 1)


FIRST, NEWEST = (f"step_{s:08d}" for s in TRAINED_STEPS)
UNCOMMITTED = f"step_{TRAINED_STEPS[-1] + 1:08d}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory, trained_ar_run):
    """The trained run's checkpoints (a copy: tests add to it) and tokenizer, and another tokenizer."""
    root = tmp_path_factory.mktemp("sample_cli")
    shutil.copytree(trained_ar_run / "checkpoints", root / "run")
    shutil.copytree(trained_ar_run.parent / "tokenizer", root / "tokenizer")
    write_tokenizer(root / "other_tokenizer", seed=1)
    (root / "run" / UNCOMMITTED).mkdir()           # uncommitted: ignored
    return root


def sample(assets, out, *extra):
    return videoar(["sample", "--ckpt", str(assets / "run"), "--tokenizer", str(assets / "tokenizer"),
                    "--recipe", str(TINY), "--out", str(out), *extra])


def decode(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def test_help_explains_every_knob(capsys):
    with pytest.raises(SystemExit) as done:
        videoar(["sample", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for knob in ("guidance.schedule", "guidance.first_scale", "temperature", "top_p", "frames", "seed",
                 "context_latent_frames", "cuda_graph", "output.fps", "--class", "--prompt", "--video", "--image"):
        assert knob in text, knob


def test_class_samples_files_index_and_grid(assets, tmp_path):
    out = tmp_path / "a"
    assert sample(assets, out, "--class", "1,3", "--num", "3") == 0
    index = json.loads((out / "index.json").read_text())
    assert index["step"] == TRAINED_STEPS[-1] and index["checkpoint"].endswith(NEWEST)   # newest committed
    assert [s["id"] for s in index["samples"]] == list(range(6))
    assert [s["condition"]["class"] for s in index["samples"]] == [1, 1, 1, 3, 3, 3]
    assert index["tokenizer_hash"] and index["seed"] == 0 and index["resolution"] == [64, 64]
    assert all(s["seed"] == 0 for s in index["samples"])
    for s in index["samples"]:
        frames = decode(out / s["file"])
        assert frames.shape == (WINDOW, 64, 64, 3) and s["frames"] == WINDOW
    gif = Image.open(out / "grid.gif")
    assert gif.n_frames == WINDOW and gif.size == (6 * 66 + 2, 66 + 2)  # 6 tiles in one row, 2 px gaps
    assert Image.open(out / "frames.png").size[1] == 6 * 66 + 2
    assert (out / "config.yaml").is_file()

    again = tmp_path / "b"           # same seed: the same files
    assert sample(assets, again, "--class", "1,3", "--num", "3") == 0
    for s in index["samples"]:
        assert (out / s["file"]).read_bytes() == (again / s["file"]).read_bytes()
    # Another batch size samples the same bits (test_sample_sampler); the tokenizer's batched convs
    # may move a pixel by one level, which the encoder then spreads a little.
    rebatched = tmp_path / "b5"
    assert sample(assets, rebatched, "--class", "1,3", "--num", "3", "--set", "batch_size=5") == 0
    for s in index["samples"]:
        diff = np.abs(decode(out / s["file"]).astype(int) - decode(rebatched / s["file"]).astype(int))
        assert diff.mean() < 0.5, (s["id"], diff.mean())
    reseeded = tmp_path / "c"
    assert sample(assets, reseeded, "--class", "1", "--num", "1", "--set", "seed=7") == 0
    assert not np.array_equal(decode(reseeded / "videos/sample_00000.mp4"), decode(out / "videos/sample_00000.mp4"))


def test_frame_sheet_shows_every_sample_labelled_by_its_class(assets, tmp_path):
    """frames.png has one row per sample (10 here, more than output.grid_columns = 8), each starting
    with a label tile: the same class gives the same label, another class another one."""
    out = tmp_path / "sheet"
    assert sample(assets, out, "--class", "0,1,2,3,4", "--num", "2") == 0
    index = json.loads((out / "index.json").read_text())
    assert index["frame_sheet_rows"] == [f"class {c}" for c in range(5) for _ in range(2)]
    sheet = np.asarray(Image.open(out / "frames.png").convert("RGB"))
    tile, pad = 64, 2
    assert sheet.shape[0] == 10 * (tile + pad) + pad
    frames_wide = WINDOW * (tile + pad)
    label_w = sheet.shape[1] - frames_wide - pad
    assert label_w > 0
    labels = [sheet[pad + r * (tile + pad):pad + r * (tile + pad) + tile, :label_w + pad] for r in range(10)]
    assert all((lab < 128).any() for lab in labels)                   # dark text on every row
    assert all(np.array_equal(labels[2 * c], labels[2 * c + 1]) for c in range(5))
    assert len({labels[2 * c].tobytes() for c in range(5)}) == 5


def test_the_console_shows_our_messages_and_no_library_warnings(assets, tmp_path):
    """Issue 23: torch/Megatron FutureWarnings (with their source lines) came before sample's own output."""
    import re
    import subprocess
    import sys
    from subprocess_env import child_env
    proc = subprocess.run([sys.executable, "-m", "videoar_megatron.cli", "sample", "--ckpt", str(assets / "run"),
                           "--tokenizer", str(assets / "tokenizer"), "--recipe", str(TINY), "--class", "1",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, env=child_env(),
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "wrote 1 videos" in proc.stdout
    warnings = [line for line in proc.stderr.splitlines() if re.search(r"\w+Warning\b|warnings\.warn", line)]
    assert not warnings, "\n".join(warnings)


def test_class_names_long_videos_and_step_directories(assets, tmp_path):
    names = tmp_path / "classes.txt"
    names.write_text("Archery\nBowling\nDiving\nFencing\nSurfing\n")
    out = tmp_path / "long"
    assert videoar(["sample", "--ckpt", str(assets / "run" / FIRST), "--tokenizer", str(assets / "tokenizer"),
                    "--recipe", str(TINY), "--out", str(out), "--class", "Diving", "--class-names", str(names),
                    "--set", "frames=19"]) == 0
    index = json.loads((out / "index.json").read_text())
    assert index["step"] == TRAINED_STEPS[0]
    assert index["samples"][0]["condition"] == {"class": 2, "class_name": "Diving"}
    assert decode(out / "videos/sample_00000.mp4").shape[0] == 19


def test_run_directory_is_accepted_as_ckpt(assets, tmp_path):
    """`--ckpt runs/ar/NAME` (a run directory: checkpoints under checkpoints/) finds its newest step."""
    from videoar_megatron.sampling.loading import SamplerLoadError, resolve_checkpoint
    run = tmp_path / "runs" / "ar" / "x"
    run.mkdir(parents=True)
    (run / "checkpoints").symlink_to(assets / "run", target_is_directory=True)
    assert resolve_checkpoint(run) == run / "checkpoints" / NEWEST
    with pytest.raises(SamplerLoadError, match="nor a run directory whose checkpoints/ holds one"):
        resolve_checkpoint(tmp_path / "runs")


def test_checkpoint_of_a_newer_format_is_refused_by_name(assets, tmp_path, capsys):
    step = shutil.copytree(assets / "run" / NEWEST, tmp_path / NEWEST)
    state = json.loads((step / "train_state.json").read_text())
    (step / "train_state.json").write_text(json.dumps({**state, "format_version": 2}))
    code = videoar(["sample", "--ckpt", str(step), "--tokenizer", str(assets / "tokenizer"), "--recipe", str(TINY),
                    "--out", str(tmp_path / "out"), "--class", "1"])
    assert_refused(capsys, code, "checkpoint format_version 2; this videoar-megatron reads format 1")


def test_video_to_video_and_image_to_video(assets, tmp_path):
    given = (np.random.default_rng(0).random((5, 64, 64, 3)) * 255).astype(np.uint8)
    clip = write_mp4(tmp_path / "in.mp4", given, fps=8)
    out = tmp_path / "v2v"
    assert sample(assets, out, "--class", "4", "--video", str(clip), "--set", "frames=13") == 0
    frames = decode(out / "videos/sample_00000.mp4")
    assert frames.shape[0] == 13
    index = json.loads((out / "index.json").read_text())
    assert index["context"] == str(clip.resolve())
    Image.fromarray(given[0]).save(tmp_path / "first.png")
    out = tmp_path / "i2v"
    assert sample(assets, out, "--class", "4", "--image", str(tmp_path / "first.png")) == 0
    assert decode(out / "videos/sample_00000.mp4").shape[0] == WINDOW


def test_refusals_name_the_problem(assets, tmp_path, capsys):
    hashes = [json.loads((assets / d / "meta.json").read_text())["content_hash"]
              for d in ("other_tokenizer", "tokenizer")]
    code = videoar(["sample", "--ckpt", str(assets / "run"), "--tokenizer", str(assets / "other_tokenizer"),
                    "--recipe", str(TINY), "--out", str(tmp_path / "x"), "--class", "1"])
    assert_refused(capsys, code, f"tokenizer mismatch.*other_tokenizer.*{hashes[0]}.*{hashes[1]}")
    assert_refused(capsys, sample(assets, tmp_path / "y", "--prompt", "a cat"), "class-conditional: give --class")
    assert_refused(capsys, sample(assets, tmp_path / "z", "--class", "9"), r"--class ids \[9\] outside \[0, 5\)")
    (assets / "run" / UNCOMMITTED / "train_state.json").write_text("{}")
    code = videoar(["sample", "--ckpt", str(assets / "run" / UNCOMMITTED), "--tokenizer",
                    str(assets / "tokenizer"), "--out", str(tmp_path / "w"), "--class", "1"])
    assert_refused(capsys, code, "no COMMITTED marker")
    assert_refused(capsys, sample(assets, tmp_path / "v", "--class", "1", "--set", "top_p=2"), "top_p")


def test_prompts_through_a_local_text_tokenizer(assets, tmp_path, capsys):
    """kind text_tokens: prompts are tokenized by the local Hugging Face tokenizer the shards used. The
    trainer refuses text_tokens (no shards carry caption ids yet), so this checkpoint is hand-made."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "a", "cat", "dog", "runs", "on", "the", "beach"]
    core = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(
        tmp_path / "text_tokenizer")
    ctx = init_distributed(device="cpu")
    groups = init_model_parallel(ctx, ParallelConfig())
    cfg = model_config(condition={"kind": "text_tokens", "vocab_size": len(words), "text_len": 6})
    digest = json.loads((assets / "tokenizer" / "meta.json").read_text())["content_hash"]
    write_ar_checkpoint(tmp_path / "t2v", 3, cfg, digest, ctx, groups)
    destroy_model_parallel(ctx)
    out = tmp_path / "out"
    args = ["sample", "--ckpt", str(tmp_path / "t2v"), "--tokenizer", str(assets / "tokenizer"),
            "--recipe", str(TINY), "--set", "guidance.schedule=t2v"]
    assert videoar([*args, "--out", str(out), "--prompt", "a cat runs", "--prompt", "the dog on the beach",
                    "--num", "2", "--text-encoder", str(tmp_path / "text_tokenizer")]) == 0
    index = json.loads((out / "index.json").read_text())
    assert [s["condition"]["prompt"] for s in index["samples"]] == ["a cat runs"] * 2 + ["the dog on the beach"] * 2
    assert decode(out / "videos/sample_00003.mp4").shape[0] == WINDOW
    assert_refused(capsys, videoar([*args, "--out", str(tmp_path / "x"), "--prompt", "a cat"]),
                   "--prompt needs --text-encoder")
    assert_refused(capsys, videoar([*args, "--out", str(tmp_path / "y"), "--class", "1"]), "text-conditioned")
