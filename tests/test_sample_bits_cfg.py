"""Per-bit sampling, counter-based random streams and guidance schedules (no model)."""
from __future__ import annotations

import random

import pytest
import torch

from videoar_common.config import ConfigError, build_dataclass, load_config
from videoar_megatron.sampling.bits import mix32, mix32_int, sample_bits, sample_key, uniform
from videoar_megatron.sampling.cfg import combine, guidance_table, uses_unconditional
from videoar_megatron.sampling.config import GuidanceConfig, SamplingConfig

KEYS = torch.tensor([sample_key(0, i) for i in range(16)])


def test_tensor_hash_equals_the_python_hash():
    xs = [random.Random(0).getrandbits(32) for _ in range(500)] + [0, 1, 2 ** 32 - 1]
    assert mix32(torch.tensor(xs)).tolist() == [mix32_int(x) for x in xs]


def test_uniforms_are_uniform_and_independent_across_samples_and_steps():
    u = uniform(KEYS, 7, 64, 48)
    assert u.shape == (16, 64, 48) and u.dtype == torch.float32
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean().item() - 0.5) < 0.01 and abs(u.std().item() - 12 ** -0.5) < 0.01
    corr = torch.corrcoef(u.flatten(1)) - torch.eye(16)
    assert corr.abs().max() < 0.1                       # 3072 draws each: |r| ~ 0.02 for independent rows
    other = uniform(KEYS, 8, 64, 48)
    assert torch.corrcoef(torch.stack([u.flatten(), other.flatten()]))[0, 1].abs() < 0.01
    assert not torch.equal(uniform(torch.tensor([sample_key(1, 0)]), 7, 64, 48)[0], u[0])   # seed matters


def test_a_samples_stream_does_not_depend_on_its_batch():
    full = uniform(KEYS, 3, 9, 8)
    assert torch.equal(uniform(KEYS[5:6], 3, 9, 8)[0], full[5])
    assert torch.equal(uniform(KEYS.flip(0), 3, 9, 8), full.flip(0))
    assert sample_key(0, 5, 1) != sample_key(0, 5, 0) != sample_key(1, 5, 0)


def test_greedy_temperature_and_frequencies():
    z = torch.linspace(-3, 3, 13)[None, :, None].expand(1, 13, 4000).contiguous()
    u = uniform(torch.tensor([123]), 0, 13, 4000)
    assert torch.equal(sample_bits(z, u, temperature=0.0, top_p=1.0), z > 0)
    for tau in (1.0, 2.0):
        freq = sample_bits(z, u, temperature=tau, top_p=1.0).float().mean(-1)[0]
        torch.testing.assert_close(freq, torch.sigmoid(z[0, :, 0] / tau), atol=0.03, rtol=0)


def test_top_p_keeps_the_likelier_bit_when_it_is_probable_enough():
    z = torch.tensor([[[-4.0, -1.0, 0.0, 0.5, 4.0]]]).expand(1, 1000, 5).contiguous()
    u = uniform(torch.tensor([9]), 0, 1000, 5)
    bits = sample_bits(z, u, temperature=1.0, top_p=0.95)
    # |z| = 4: max prob 0.982 >= 0.95 -> always the likelier value; |z| <= 1: still sampled
    assert not bits[0, :, 0].any() and bits[0, :, 4].all()
    assert 0.1 < bits[0, :, 1].float().mean() < 0.45 and 0.4 < bits[0, :, 2].float().mean() < 0.6
    assert torch.equal(sample_bits(z, u, temperature=1.0, top_p=0.5), z > 0)    # p <= 0.5: greedy


def test_gamma_one_is_exactly_the_conditional_logits():
    cond = torch.randn(2, 9, 8)
    uncond = torch.randn(2, 9, 8) * 1e4
    assert torch.equal(combine(cond, uncond, 1.0), cond)
    assert torch.equal(combine(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(combine(cond, uncond, 3.0), 3 * cond - 2 * uncond)


def test_ucf101_schedule_ramps_across_frames_then_within_each_frame():
    g = guidance_table(GuidanceConfig(schedule="ucf101"), 5, 6)
    torch.testing.assert_close(g[:, 0], torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(g[:, -1], torch.full((5,), 10.0, dtype=torch.float64))
    torch.testing.assert_close(g[0], torch.linspace(1, 10, 6, dtype=torch.float64))
    assert (g.diff(dim=1) > 0).all()


def test_t2v_schedule_goes_from_5_to_3_over_the_decoding_order():
    g = guidance_table(GuidanceConfig(schedule="t2v"), 3, 4).flatten()
    assert g[0] == 5.0 and g[-1] == 3.0 and (g.diff() < 0).all()
    torch.testing.assert_close(g.diff(), torch.full((11,), -2 / 11, dtype=torch.float64))


def test_constant_and_table_schedules():
    assert not uses_unconditional(guidance_table(GuidanceConfig(gamma=1.0), 3, 2))
    assert uses_unconditional(guidance_table(GuidanceConfig(gamma=1.5), 3, 2))
    table = GuidanceConfig(schedule="table", table=[[1, 2], [3, 4]])
    assert guidance_table(table, 3, 2).tolist() == [[1, 2], [3, 4], [3, 4]]   # last row repeats
    with pytest.raises(ValueError, match="guidance.table rows have 2 values but .* 3 scales"):
        guidance_table(table, 2, 3)
    # one frame / one scale: the ramps give their start values
    assert guidance_table(GuidanceConfig(schedule="ucf101"), 1, 1).tolist() == [[1.0]]


def test_config_errors_name_the_knob(tmp_path):
    with pytest.raises(ConfigError, match="top_p"):
        build_dataclass(SamplingConfig, {"top_p": 0.0})
    with pytest.raises(ConfigError, match="temperature"):
        build_dataclass(SamplingConfig, {"temperature": -1})
    with pytest.raises(ConfigError, match="guidance.table"):
        build_dataclass(SamplingConfig, {"guidance": {"schedule": "table"}})
    with pytest.raises(ConfigError, match="unknown key 'guidance.gama'"):
        build_dataclass(SamplingConfig, {"guidance": {"gama": 2}})


@pytest.mark.parametrize("name", ["base", "ucf101", "t2v", "tiny"])
def test_recipes_parse(name):
    from pathlib import Path
    cfg = load_config(SamplingConfig, Path(__file__).resolve().parents[1] / "recipes" / "sample" / f"{name}.yaml")
    assert cfg.top_p == 0.97
    if name == "ucf101":
        assert cfg.guidance.schedule == "ucf101" and cfg.frames == 17
        assert guidance_table(cfg.guidance, 5, 6)[4, 0] == 5.0
    if name == "t2v":
        assert cfg.guidance.ramp == (5.0, 3.0)
