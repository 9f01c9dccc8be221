"""I3D: shapes, weight loading (state dict and TorchScript) round trips, clear errors, preprocessing."""
from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F

from videoar_megatron.evaluation.i3d import (FeatureExtractor, FeatureExtractorConfig, I3DWeightsError,
                                             InceptionI3d, detect_format, export_torchscript,
                                             load_feature_extractor, resize_frames_tf1)

pytestmark = pytest.mark.filterwarnings("ignore:.*torch.jit.*deprecated:FutureWarning")


def random_i3d(seed: int = 0) -> InceptionI3d:
    """Random weights that keep activations alive through 60 layers (PyTorch's default conv init
    shrinks them until every clip gets the same features), and random BatchNorm statistics (so a
    lost running_var would show)."""
    torch.manual_seed(seed)
    net = InceptionI3d()
    for m in net.modules():
        if isinstance(m, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        if isinstance(m, torch.nn.BatchNorm3d):
            m.running_mean.uniform_(-0.05, 0.05)
            m.running_var.uniform_(0.8, 1.2)
            m.weight.data.uniform_(0.8, 1.2)
    return net.eval()


@pytest.fixture(scope="module")
def net():
    return random_i3d()


@pytest.fixture(scope="module")
def clips():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 256, (2, 3, 17, 128, 128), generator=g, dtype=torch.uint8)


@pytest.fixture(scope="module")
def eager_out(net, clips):
    ex = FeatureExtractor(net, backend="module", cfg=FeatureExtractorConfig(), weights_sha256="")
    with torch.no_grad():
        return net(ex.preprocess(clips))


def test_clips_map_to_400_logits_and_1024_pool_features(eager_out):
    logits, pool = eager_out
    assert logits.shape == (2, 400) and pool.shape == (2, 1024)
    assert torch.isfinite(logits).all() and torch.isfinite(pool).all()
    assert (logits[0] - logits[1]).abs().max() > 1e-3  # the two clips are told apart
    assert (pool >= 0).all()  # average of ReLU outputs


def test_state_dict_round_trips_through_the_loader(net, clips, eager_out, tmp_path):
    path = tmp_path / "rgb_imagenet.pt"
    torch.save(net.state_dict(), path)
    for feature, expected in (("logits", eager_out[0]), ("pool", eager_out[1])):
        ex = load_feature_extractor(FeatureExtractorConfig(weights=str(path), feature=feature))
        assert ex.backend == "state_dict" and ex.dim == expected.shape[1]
        assert ex.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
        feats = ex(clips)
        assert feats.dtype == torch.float64
        torch.testing.assert_close(feats, expected.double(), rtol=1e-5, atol=1e-6)


def test_dataparallel_prefixed_state_dict_loads(net, tmp_path):
    path = tmp_path / "i3d_pretrained_400.pt"
    torch.save({f"module.{k}": v for k, v in net.state_dict().items()}, path)
    ex = load_feature_extractor(FeatureExtractorConfig(weights=str(path)))
    for (k, a), b in zip(net.state_dict().items(), ex.net.state_dict().values()):
        assert torch.equal(a, b), k


def test_torchscript_export_round_trips_through_the_loader(net, tmp_path):
    path = export_torchscript(net, tmp_path / "i3d_torchscript.pt")
    assert detect_format(path) == "torchscript"
    ex_ts = load_feature_extractor(FeatureExtractorConfig(weights=str(path)))
    ex_eager = FeatureExtractor(net, backend="module", cfg=FeatureExtractorConfig(), weights_sha256="")
    g = torch.Generator().manual_seed(2)
    clip = torch.randint(0, 256, (1, 3, 9, 64, 64), generator=g, dtype=torch.uint8)
    assert ex_ts.backend == "torchscript"
    torch.testing.assert_close(ex_ts(clip), ex_eager(clip), rtol=1e-5, atol=1e-6)


def test_torchscript_call_signature_matches_stylegan_v(net, tmp_path):
    """rescale: [0, 255] → [-1, 1]; resize: to 224; return_features: logits, else softmax."""
    module = torch.jit.load(str(export_torchscript(net, tmp_path / "i3d_torchscript.pt")))
    g = torch.Generator().manual_seed(3)
    x255 = torch.randint(0, 256, (1, 3, 9, 224, 224), generator=g).float()
    with torch.no_grad():
        feats = module(x255 / 127.5 - 1, rescale=False, resize=False, return_features=True)
        torch.testing.assert_close(module(x255, rescale=True, resize=False, return_features=True), feats)
        probs = module(x255 / 127.5 - 1)
        torch.testing.assert_close(probs, F.softmax(feats, dim=1))
        small = F.interpolate(x255 / 127.5 - 1, size=(9, 112, 112), mode="trilinear", align_corners=False)
        assert module(small, resize=True, return_features=True).shape == (1, 400)


def test_absent_weights_name_the_expected_file(tmp_path):
    missing = tmp_path / "nowhere" / "i3d_torchscript.pt"
    with pytest.raises(I3DWeightsError) as err:
        load_feature_extractor(FeatureExtractorConfig(weights=str(missing)))
    text = str(err.value)
    assert str(missing) in text and "i3d_torchscript.pt" in text and "rgb_imagenet.pt" in text
    assert "extractor.weights" in text
    with pytest.raises(I3DWeightsError, match="extractor.weights is empty"):
        load_feature_extractor(FeatureExtractorConfig(weights=""))


def test_wrong_state_dict_is_refused_with_the_keys(tmp_path):
    path = tmp_path / "not_i3d.pt"
    torch.save(torch.nn.Linear(3, 4).state_dict(), path)
    with pytest.raises(I3DWeightsError, match="missing keys.*expected the Kinetics-400 I3D"):
        load_feature_extractor(FeatureExtractorConfig(weights=str(path)))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(I3DWeightsError, match="cannot be read"):
        load_feature_extractor(FeatureExtractorConfig(weights=str(garbage)))


class TenWayHead(torch.nn.Module):
    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3, 4)).repeat(1, 4)[:, :10]


def test_torchscript_with_the_wrong_output_is_refused(tmp_path):
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.save(torch.jit.script(TenWayHead()), str(path))
    ex = load_feature_extractor(FeatureExtractorConfig(weights=str(path)))
    with pytest.raises(I3DWeightsError, match=r"returned shape \(1, 10\)"):
        ex(torch.zeros(1, 3, 9, 32, 32, dtype=torch.uint8))
    with pytest.raises(I3DWeightsError, match="pool needs state-dict weights"):
        load_feature_extractor(FeatureExtractorConfig(weights=str(path), feature="pool"))


def test_uint8_and_float_inputs_are_the_same_video(net):
    ex = FeatureExtractor(net, backend="module", cfg=FeatureExtractorConfig(), weights_sha256="")
    g = torch.Generator().manual_seed(4)
    u8 = torch.randint(0, 256, (1, 3, 9, 32, 32), generator=g, dtype=torch.uint8)
    as_float = u8.float() / 127.5 - 1
    assert torch.equal(ex.preprocess(u8), ex.preprocess(as_float))
    # Overshoot of a decoder is clamped; quantize_uint8 snaps floats to the 256 levels.
    assert ex.preprocess(as_float * 1.5).abs().max() <= 1.0
    assert torch.equal(ex.preprocess(as_float + 1e-3), ex.preprocess(as_float))


def test_too_few_frames_is_a_clear_error(net):
    ex = FeatureExtractor(net, backend="module", cfg=FeatureExtractorConfig(), weights_sha256="")
    with pytest.raises(ValueError, match="at least 9 frames"):
        ex(torch.zeros(1, 3, 8, 64, 64, dtype=torch.uint8))


def test_tf1_resize_is_tf_resize_bilinear_without_half_pixel_centres():
    # TF1 resize_bilinear maps output pixel j to input j * in/out: at 2x, even outputs copy input
    # pixels, odd ones average two neighbours, and the last one clamps at the border.
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 1, 112, 112, generator=g, dtype=torch.float64)
    y = resize_frames_tf1(x, 224)
    assert y.shape == (1, 1, 224, 224)
    torch.testing.assert_close(y[..., ::2, ::2], x)
    torch.testing.assert_close(y[..., ::2, 1:-1:2], (x[..., :, :-1] + x[..., :, 1:]) / 2)
    torch.testing.assert_close(y[..., ::2, -1], x[..., :, -1])
    # PyTorch's half-pixel bilinear is a different resize: the knob matters.
    assert not torch.allclose(y, F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False))
