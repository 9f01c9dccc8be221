"""Causal 3D tokenizer: causality (chunked == whole), images are the T=0 case, checkpoint round trip."""
from __future__ import annotations

import pytest
import torch

from tokenizer.checkpoint import TokenizerCheckpointError, load_tokenizer, save_tokenizer
from tokenizer.config import TokenizerModelConfig
from tokenizer.model import StreamState, VideoTokenizer

SMALL = dict(base_channels=8, channel_mult=[1, 1, 2, 2, 2], norm_groups=4, latent_dim=8)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return VideoTokenizer(TokenizerModelConfig(**SMALL)).eval()


def video(frames=17, size=64, batch=2, seed=0):
    return torch.rand(batch, 3, frames, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@torch.no_grad()
def test_shapes_follow_the_compression_factors(model):
    latent = model.encode(video())
    assert latent.shape == (2, 8, 5, 4, 4)             # 1 + 16/4 frames, 64/16 grid
    assert model.decode(latent).shape == (2, 3, 17, 64, 64)
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        model.encode(video(frames=16))


@torch.no_grad()
def test_chunked_encoding_equals_whole_clip(model):
    x = video(frames=33)
    whole = model.encode(x)
    stream = StreamState()
    chunks = [model.encode(x[:, :, :9], stream), model.encode(x[:, :, 9:21], stream),
              model.encode(x[:, :, 21:], stream)]
    torch.testing.assert_close(torch.cat(chunks, dim=2), whole, rtol=0, atol=1e-5)
    # and a prefix never depends on later frames
    torch.testing.assert_close(model.encode(x[:, :, :5]), whole[:, :, :2], rtol=0, atol=1e-5)


@torch.no_grad()
def test_chunked_decoding_equals_whole(model):
    latent = model.encode(video(frames=17))
    whole = model.decode(latent)
    stream = StreamState()
    parts = [model.decode(latent[:, :, :2], stream), model.decode(latent[:, :, 2:], stream)]
    assert parts[0].shape[2] == 5 and parts[1].shape[2] == 12
    torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=0, atol=1e-5)


@torch.no_grad()
def test_image_path_equals_video_frame_zero(model):
    x = video()
    torch.testing.assert_close(model.encode(x[:, :, :1]), model.encode(x)[:, :, :1], rtol=0, atol=1e-6)


def test_checkpoint_round_trip_and_hash(tmp_path, model):
    digest = save_tokenizer(model, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.content_hash == digest and len(digest) == 64
    x = video(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode(x), model.encode(x), rtol=0, atol=0)
    # same weights → same hash; changed weights → different hash
    assert save_tokenizer(loaded, tmp_path / "tok2") == digest
    with torch.no_grad():
        loaded.decoder.conv_out.conv.bias.add_(1.0)
    assert save_tokenizer(loaded, tmp_path / "tok3") != digest


def test_incomplete_or_tampered_checkpoint_is_refused(tmp_path, model):
    save_tokenizer(model, tmp_path / "tok")
    (tmp_path / "tok" / "COMMITTED").unlink()
    with pytest.raises(TokenizerCheckpointError, match="no COMMITTED marker"):
        load_tokenizer(tmp_path / "tok")
    save_tokenizer(model, tmp_path / "tok")
    (tmp_path / "tok" / "meta.json").write_text('{"content_hash": "abc", "format": 1}')
    with pytest.raises(TokenizerCheckpointError, match="do not match the content hash"):
        load_tokenizer(tmp_path / "tok")
    with pytest.raises(TokenizerCheckpointError, match="not found"):
        load_tokenizer(tmp_path / "nothing")


def test_run_directory_and_newer_format_get_errors_that_say_what_to_do(tmp_path, model):
    save_tokenizer(model, tmp_path / "run" / "tokenizer")          # how `videoar tokenizer train` exports
    with pytest.raises(TokenizerCheckpointError, match=r"is a tokenizer training run directory: its tokenizer is "
                                                       r".*run/tokenizer"):
        load_tokenizer(tmp_path / "run")
    meta = tmp_path / "run" / "tokenizer" / "meta.json"
    meta.write_text(meta.read_text().replace('"format": 1', '"format": 2'))
    with pytest.raises(TokenizerCheckpointError, match="tokenizer format 2; this videoar-megatron reads format 1"):
        load_tokenizer(tmp_path / "run" / "tokenizer")
