"""Videos through the tokenizer: window lengths, long videos window by window, V2V and I2V keep their
prefix bit for bit and give exactly the requested number of frames (tiny model + tiny tokenizer)."""
from __future__ import annotations

import pytest
import torch

from sample_helpers import LATENT_FRAMES, SCALES, make_model, make_tokenizer, model_config
from videoar_common.config import build_dataclass
from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
from videoar_megatron.sampling.config import SamplingConfig
from videoar_megatron.sampling.extend import encode_known_bits, generate_videos
from videoar_megatron.sampling.sampler import Conditions, VideoARSampler

WINDOW = 1 + 4 * (LATENT_FRAMES - 1)   # 9 pixel frames


@pytest.fixture(scope="module")
def setup():
    ctx = init_distributed(device="cpu")
    groups = init_model_parallel(ctx, ParallelConfig())
    cfg = model_config()
    tokenizer = make_tokenizer()
    sampling = build_dataclass(SamplingConfig, {"guidance": {"schedule": "ucf101"}, "top_p": 0.95})
    sampler = VideoARSampler(make_model(cfg, groups), tokenizer.quantizer_for(SCALES), cfg, sampling,
                             window_frames=LATENT_FRAMES)
    yield sampler, tokenizer
    destroy_model_parallel(ctx)
    shutdown_distributed()


COND = Conditions.labels([2, 0])
IDS = [10, 11]


def videos(setup, **kw) -> torch.Tensor:
    sampler, tokenizer = setup
    return generate_videos(sampler, tokenizer, COND, IDS, seed=0, **kw)


def test_one_window_and_shorter_videos(setup):
    full = videos(setup)
    assert full.shape == (2, 3, WINDOW, 64, 64) and full.dtype == torch.float32
    assert full.abs().max() <= 1 and full.std() > 0.01
    five = videos(setup, frames=5)
    assert five.shape[2] == 5 and torch.equal(five, full[:, :, :5])     # 2 latent frames = a prefix
    assert torch.equal(videos(setup, frames=7), full[:, :, :7])         # cut inside the last latent frame


@pytest.mark.parametrize("frames", [17, 22])
def test_long_videos_are_extended_window_by_window(setup, frames):
    full = videos(setup)
    long = videos(setup, frames=frames, context_latent_frames=2)
    assert long.shape == (2, 3, frames, 64, 64)
    assert torch.equal(long[:, :, :WINDOW], full)                       # earlier windows untouched
    assert not torch.equal(long[:, :, WINDOW:WINDOW + 4], long[:, :, WINDOW - 4:WINDOW])


def test_video_to_video_keeps_the_given_frames_exactly(setup):
    sampler, tokenizer = setup
    given = torch.rand(1, 3, 7, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    out = videos(setup, context=given, frames=15, context_latent_frames=2)
    assert out.shape == (2, 3, 15, 64, 64)
    assert torch.equal(out[:, :, :7], given.expand(2, -1, -1, -1, -1))
    default = videos(setup, context=given)                  # context + one window of new frames
    assert default.shape[2] == 7 + 4 * (LATENT_FRAMES - 2) and torch.equal(default, out[:, :, :default.shape[2]])
    # the continuation is conditioned on the re-encoded tail: another tail gives other frames
    other = given.clone()
    other[:, :, -5:] = -other[:, :, -5:]
    assert not torch.equal(videos(setup, context=other, frames=15)[:, :, 7:], out[:, :, 7:])
    # the known bits are the tokenizer's own quantization (its training forward: encode, multi-scale
    # BSQ) of the last 1 + 4(c-1) given frames, token by token and bit by bit
    bits = encode_known_bits(tokenizer, sampler.quantizer, given[:, :, 2:])
    assert bits.shape == (1, 2, sampler.quantizer.tokens_per_frame, 8)
    assert torch.equal(bits, tokenizer_bits(tokenizer, given[:, :, 2:]))
    assert not torch.equal(bits, tokenizer_bits(tokenizer, given[:, :, :5]))  # the first frames differ


def tokenizer_bits(tokenizer, clip_BCTHW: torch.Tensor) -> torch.Tensor:
    """``(B, c, L, d)`` bits from ``VideoTokenizer.forward``'s quantizer output (scales in order,
    row-major inside a scale), the schedule being the tokenizer's own (= SCALES)."""
    assert [tuple(s) for s in tokenizer.cfg.scale_schedule] == SCALES
    with torch.no_grad():
        _, q = tokenizer(clip_BCTHW)
    B = clip_BCTHW.shape[0]
    c = q.bits[0].shape[0] // B                                        # latent frames
    per_scale = [b.reshape(B, c, h * w, b.shape[-1]) for b, (h, w) in zip(q.bits, SCALES)]
    return torch.cat(per_scale, dim=2)


def test_image_to_video(setup):
    image = torch.rand(2, 3, 1, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    out = videos(setup, context=image, frames=WINDOW)
    assert out.shape == (2, 3, WINDOW, 64, 64) and torch.equal(out[:, :, :1], image)
    assert videos(setup, context=image).shape[2] == WINDOW              # default: one window
    assert torch.equal(videos(setup, context=image, frames=WINDOW), out)  # same seed, same video


def test_extension_errors(setup):
    with pytest.raises(ValueError, match=r"this checkpoint makes \(64, 64\)"):
        videos(setup, context=torch.zeros(1, 3, 5, 32, 32))
    with pytest.raises(ValueError, match="no new frames"):
        videos(setup, context=torch.zeros(1, 3, 5, 64, 64), frames=5)
