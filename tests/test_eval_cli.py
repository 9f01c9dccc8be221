"""``videoar eval`` end to end on CPU: a synthetic VP9 corpus decoded by DALI, a random-weight I3D
written to disk, real statistics computed then read back from the cache; gFVD of a real tiny training
run's checkpoint through the sampler; rFVD through a real tokenizer checkpoint."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_prep.synth import make_corpus
from sample_helpers import TRAINED_STEPS
from test_eval_i3d import random_i3d
from videoar_megatron.cli.eval import main
from videoar_common.distributed import DistContext
from videoar_common.exit_codes import InputError
from videoar_megatron.evaluation.clips import ManifestClipSource
from videoar_megatron.evaluation.fvd import FeatureStats, RealStatsCache
from videoar_megatron.evaluation.i3d import FeatureExtractorConfig, load_feature_extractor
from videoar_megatron.evaluation.protocols import FVDPlan, FVDProtocolConfig, real_cache_fields

TINY = Path(__file__).resolve().parents[1] / "recipes" / "eval" / "tiny.yaml"
SAMPLE_TINY = Path(__file__).resolve().parents[1] / "recipes" / "sample" / "tiny.yaml"
SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                     backend="gloo")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    manifest = make_corpus(root, num=6, classes=3, codec="vp9", frames=17, size=(64, 64), fps=8, seed=0)
    weights = root / "rgb_imagenet.pt"
    torch.save(random_i3d(seed=3).state_dict(), weights)
    return manifest, weights


def overrides(corpus, cache: Path) -> list[str]:
    manifest, weights = corpus
    sets = {"data.train_manifest": manifest, "data.heldout_manifest": manifest, "extractor.weights": weights,
            "cache_dir": cache, "protocol.num_samples": 3}
    return [x for k, v in sets.items() for x in ("--set", f"{k}={v}")]


def test_help_explains_every_knob(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for knob in ("protocol.num_samples", "protocol.label_source", "extractor.weights", "extractor.resize",
                 "data.clips_per_video", "recon.num_clips"):
        assert knob in text
    assert "fvd" in text and "rfvd" in text and "real-stats" in text


def test_real_stats_are_computed_once_then_read_from_the_cache(corpus, tmp_path, capsys):
    cache = tmp_path / "cache"
    assert main(["real-stats", "--recipe", str(TINY), *overrides(corpus, cache)]) == 0
    assert capsys.readouterr().out.count(": computed ") == 2            # tiny: 2 folds, a real set each
    files = sorted(cache.glob("real_*.npz"))
    assert len(files) == 2
    assert main(["real-stats", "--recipe", str(TINY), *overrides(corpus, cache)]) == 0
    assert capsys.readouterr().out.count(": cached ") == 2

    # The cached statistics are those of the plan's clips, decoded and pushed through the I3D.
    manifest, weights = corpus
    cfg = FVDProtocolConfig(name="tiny", num_frames=9, resolution=64, fps=0, num_samples=3, num_folds=2, batch_size=4)
    source = ManifestClipSource(manifest, num_frames=9, resolution=64, fps=0, clips_per_video=2)
    extractor = load_feature_extractor(FeatureExtractorConfig(weights=str(weights), batch_size=4))
    clips = source.load(FVDPlan(cfg, source).real_indices(0))
    assert clips.shape == (3, 3, 9, 64, 64) and clips.dtype == torch.uint8
    direct = FeatureStats(400)
    direct.update(extractor(clips))
    cached = RealStatsCache(cache).load(real_cache_fields(cfg, source, extractor, 0))
    assert cached.n == 3
    np.testing.assert_allclose(cached.mean_cov()[0], direct.mean_cov()[0], rtol=1e-10)


@pytest.fixture(scope="module")
def ar_checkpoint(trained_ar_run):
    """A real tiny training run (tests/sample_helpers.train_tiny_run): class-conditional, 9-frame 64x64
    clips, its tokenizer beside it."""
    return trained_ar_run.parent


def fvd_args(ar_checkpoint, out: Path) -> list[str]:
    return ["fvd", "--recipe", str(TINY), "--checkpoint", str(ar_checkpoint / "run" / "checkpoints"),
            "--tokenizer", str(ar_checkpoint / "tokenizer"), "--sample-recipe", str(SAMPLE_TINY), "--out", str(out)]


def test_fvd_of_an_ar_checkpoint_runs_end_to_end(corpus, ar_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main([*fvd_args(ar_checkpoint, out), *overrides(corpus, tmp_path / "cache")]) == 0
    report = json.loads((out / "fvd_report.json").read_text())
    result = report["result"]
    assert result["num_samples"] == 3 and result["num_folds"] == 2
    assert all(np.isfinite(f) and f > 0 for f in result["fvd_per_fold"])
    assert report["step"] == TRAINED_STEPS[-1] and report["sampling"]["guidance"]["schedule"] == "ucf101"
    assert report["tokenizer"]["content_hash"]
    # the same recipe again gives the same numbers (samples are seeded by their global id)
    again = tmp_path / "again"
    assert main([*fvd_args(ar_checkpoint, again), *overrides(corpus, tmp_path / "cache")]) == 0
    assert json.loads((again / "fvd_report.json").read_text())["result"]["fvd_per_fold"] == result["fvd_per_fold"]


def test_fvd_refuses_a_checkpoint_of_another_resolution(corpus, ar_checkpoint, tmp_path):
    with pytest.raises(InputError, match=r"makes \(64, 64\) videos but protocol.resolution=128"):
        main([*fvd_args(ar_checkpoint, tmp_path / "out"), *overrides(corpus, tmp_path / "cache"),
              "--set", "protocol.resolution=128"])


def test_missing_i3d_weights_stop_the_command_with_the_expected_file(corpus, tmp_path):
    args = overrides(corpus, tmp_path / "cache") + ["--set", f"extractor.weights={tmp_path / 'i3d_torchscript.pt'}"]
    with pytest.raises(InputError, match="I3D weights not found.*i3d_torchscript.pt.*rgb_imagenet.pt"):
        main(["real-stats", "--recipe", str(TINY), *args])


def test_rfvd_reports_psnr_and_ssim_of_the_heldout_clips_and_their_reconstructions(corpus, tmp_path):
    """The report's PSNR and SSIM are those of the decoded held-out clips against the tokenizer's own
    reconstruction (``VideoTokenizer.forward``: encode, quantize, decode), computed here by numpy and
    scipy.ndimage, not by the code under test."""
    import tokenizer
    from test_eval_recon import reference_ssim
    from tokenizer.config import TokenizerModelConfig
    from tokenizer.model import VideoTokenizer

    torch.manual_seed(0)
    tok_dir = tmp_path / "tokenizer"
    tokenizer.save_tokenizer(VideoTokenizer(TokenizerModelConfig()), tok_dir)
    out = tmp_path / "out"
    assert main(["rfvd", "--recipe", str(TINY), "--tokenizer", str(tok_dir), "--out", str(out),
                 *overrides(corpus, tmp_path / "cache"), "--set", "recon.num_clips=0"]) == 0
    report = json.loads((out / "rfvd_report.json").read_text())
    result = report["result"]
    assert report["tokenizer"]["content_hash"] == tokenizer.checkpoint.read_tokenizer_hash(tok_dir)
    assert "VideoAR-L tokenizer (paper)" in (out / "rfvd_report.md").read_text()
    assert (out / "config.yaml").is_file()

    # recon.num_clips=0: every held-out clip (6 videos, data.heldout_clips_per_video=1), in order.
    source = ManifestClipSource(corpus[0], num_frames=9, resolution=64, fps=0, clips_per_video=1)
    real = source.load(np.arange(source.num_clips()))
    assert result["num_clips"] == len(real) == 6 and np.isfinite(result["rfvd"]) and result["rfvd"] > 1e-3
    tok = tokenizer.load_tokenizer(tok_dir)
    with torch.no_grad():
        recon = torch.cat([tok(real[i:i + 2].float() / 127.5 - 1)[0] for i in range(0, len(real), 2)])
    a = real.double().numpy() / 255.0
    b = (recon.double().clamp(-1, 1).numpy() + 1) / 2
    psnr = [10 * np.log10(1 / np.mean((a[i] - b[i]) ** 2)) for i in range(len(a))]
    ssim = [np.mean([reference_ssim(a[i, c, t], b[i, c, t]) for c in range(3) for t in range(a.shape[2])])
            for i in range(len(a))]
    assert 0.0 < np.mean(ssim) < 0.99 and 0 < np.mean(psnr) < 60     # a real, imperfect reconstruction
    assert result["psnr"] == pytest.approx(np.mean(psnr), rel=1e-6)
    assert result["ssim"] == pytest.approx(np.mean(ssim), rel=1e-6)
