"""`videoar tokenizer`: help explains every option and recipe key; inflate and eval run end to end;
shipped recipes parse, inherit from base and have the paper's sizes."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO_ROOT
from tokenizer.train_config import TokenizerTrainConfig, resolve_batch
from videoar_megatron.cli import main as videoar
from videoar_common.config import ConfigError, iter_fields, load_config, read_recipe_chain

RECIPES = REPO_ROOT / "recipes" / "tokenizer"


def test_top_level_help_lists_the_tokenizer(capsys):
    assert videoar(["--help"]) == 0
    assert "tokenizer" in capsys.readouterr().out


@pytest.mark.parametrize("sub", ["", "train", "eval", "inflate"])
def test_help_explains_every_option(capsys, sub):
    with pytest.raises(SystemExit) as exit_info:
        videoar(["tokenizer", *([sub] if sub else []), "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    if not sub:
        assert all(name in out for name in ("train", "eval", "inflate"))
        return
    from videoar_megatron.cli.tokenizer_cmd import build_parser
    parser = build_parser("videoar tokenizer")
    action = next(a for a in parser._actions if a.dest == "command").choices[sub]
    for opt in action._actions:
        assert opt.help, f"{sub}: option {opt.option_strings} has no help"
    if sub == "train":  # every recipe key is listed with its docstring
        for key, _, _, doc in iter_fields(TokenizerTrainConfig):
            assert f"  {key}  (" in out, key
            assert doc, f"recipe key {key} has no docstring"


def test_recipe_errors_name_the_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {RECIPES / 'tiny.yaml'}\nloss:\n  rec_wieght: 2.0\n")
    # exit 2 with one line naming the key, as `videoar train` (videoar_common.exit_codes)
    assert videoar(["tokenizer", "train", "--recipe", str(bad), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("videoar tokenizer train: ") and "unknown key 'loss.rec_wieght'" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match="model.scale_schedule"):
        load_config(TokenizerTrainConfig, RECIPES / "tiny.yaml", ["data.clip.height=64"])
    with pytest.raises(ConfigError, match="global_batch_size=128 is not a multiple"):
        resolve_batch(load_config(TokenizerTrainConfig, RECIPES / "ucf101_finetune.yaml"), 3)


@pytest.mark.parametrize("name", ["base", "tiny", "image_pretrain", "video_17x128", "ucf101_finetune"])
def test_shipped_recipes_parse_and_inherit(name):
    cfg = load_config(TokenizerTrainConfig, RECIPES / f"{name}.yaml")
    _, origin = read_recipe_chain(RECIPES / f"{name}.yaml")
    if name != "base":
        assert any(src.endswith("base.yaml") for src in origin.values())
    f = cfg.model.spatial_factor
    assert list(cfg.model.scale_schedule[-1]) == [cfg.data.clip.height // f, cfg.data.clip.width // f]


def test_paper_scale_sizes():
    video = load_config(TokenizerTrainConfig, RECIPES / "video_17x128.yaml")
    assert video.model.latent_dim == 48 and video.model.spatial_factor == 16 and video.model.temporal_factor == 4
    assert video.model.latent_frames(video.data.clip.num_frames) == 5          # 17 frames → 5 x 8 x 8
    assert video.model.scale_schedule[-1] == [8, 8]
    ucf = resolve_batch(load_config(TokenizerTrainConfig, RECIPES / "ucf101_finetune.yaml"), 8)
    assert ucf.global_batch_size == 128 and ucf.grad_accum_steps * ucf.data.micro_batch_size * 8 == 128
    assert ucf.steps == -(-2000 * 9537 // 128)                               # 2000 epochs of UCF-101 split 1
    assert video.init.reinflate and not ucf.init.reinflate  # inflate image → video, never video → video
    image = load_config(TokenizerTrainConfig, RECIPES / "image_pretrain.yaml")
    assert image.data.clip.num_frames == 1 and image.data.image_manifest and not image.data.manifest
    assert load_config(TokenizerTrainConfig, RECIPES / "base.yaml").loss.perceptual_weight > 0
    tiny = load_config(TokenizerTrainConfig, RECIPES / "tiny.yaml")
    assert tiny.device == "cpu" and tiny.data.synth.enabled and tiny.loss.perceptual_weight == 0


def test_inflate_command_writes_a_tokenizer_that_reproduces_the_image_model(tmp_path, capsys):
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.image2d import ImageTokenizer2D
    cfg = load_config(TokenizerTrainConfig, RECIPES / "tiny.yaml")
    torch.manual_seed(3)
    model2d = ImageTokenizer2D(cfg.model).eval()
    from safetensors.torch import save_file
    save_file(model2d.state_dict(), str(tmp_path / "image.safetensors"))
    out = tmp_path / "inflated"
    assert videoar(["tokenizer", "inflate", "--image-ckpt", str(tmp_path / "image.safetensors"),
                    "--recipe", str(RECIPES / "tiny.yaml"), "--out", str(out)]) == 0
    assert "left 8 at init" in capsys.readouterr().out  # 2 temporal down + 2 up convs x (weight, bias)
    report = json.loads((out / "inflation_report.json").read_text())
    assert report["num_mapped"] == len(model2d.state_dict())
    model3d = load_tokenizer(out)
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(model3d(image[:, :, None])[0][:, :, 0], model2d(image)[0], rtol=1e-4, atol=1e-5)


def test_eval_command_compares_with_an_untrained_tokenizer(tmp_path, capsys):
    from data_prep.synth import make_corpus
    from tokenizer.checkpoint import save_tokenizer
    from tokenizer.model import VideoTokenizer
    cfg = load_config(TokenizerTrainConfig, RECIPES / "tiny.yaml")
    save_tokenizer(VideoTokenizer(cfg.model), tmp_path / "tok")
    manifest = make_corpus(tmp_path / "heldout", num=2, classes=2, frames=9, size=(32, 32))
    assert videoar(["tokenizer", "eval", "--tokenizer", str(tmp_path / "tok"), "--manifest", str(manifest),
                    "--frames", "9", "--size", "32x32", "--out", str(tmp_path / "ev"), "--compare-untrained"]) == 0
    out = capsys.readouterr().out
    assert "PSNR trained" in out and "vs untrained" in out and "bits/scale4/entropy" in out
    for sub in ("trained", "untrained"):
        assert (tmp_path / "ev" / sub / "recon_grid.png").is_file()
        assert json.loads((tmp_path / "ev" / sub / "eval.json").read_text())["clips"] == 2


def test_the_init_stage_is_announced_with_its_steps_before_anything_runs(tmp_path, capfd):
    """Issue 23: `--set steps=1` on tiny.yaml first trained its 400-step image stage without saying so.
    The plan (both stages, their step counts and directories) comes first; here the image stage then
    stops on its missing manifest, so the test does not train."""
    image = tmp_path / "image.yaml"
    image.write_text(f"base: {RECIPES / 'tiny_image.yaml'}\nsteps: 7\n"
                     f"data:\n  synth: {{enabled: false}}\n  manifest: {tmp_path / 'missing.csv'}\n")
    run = tmp_path / "run"
    code = videoar(["tokenizer", "train", "--recipe", str(RECIPES / "tiny.yaml"), "--run-dir", str(run),
                    "--set", f"init.from_recipe={image}", "--set", "steps=1"])
    err = capfd.readouterr().err
    assert code == 2 and "missing.csv" in err.strip().splitlines()[-1], err[-3000:]
    plan = err[:err.index("missing.csv")]
    assert f"stage 1 of 2: init.from_recipe={image}: 7 steps in {run / 'init' / 'image'}" in plan, plan
    assert f"stage 2 of 2: {RECIPES / 'tiny.yaml'}: 1 step in {run}" in plan, plan
