"""The flex kernel choice (``model.flex_kernel``: auto / triton / flash) and the head padding that lets
FlashAttention-4 train head_dim 80 on Hopper, on CPU: the padding math against unpadded SDPA (values
and gradients), the auto rule over (GPU, installed FA4, head dim, length), and the model handing the
chosen kernel to its attention. The kernels themselves are checked against dense SDPA on a GPU
(tests/test_model_gpu.py)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from videoar_megatron.model.attention import (FLASH_MIN_TOKENS, FlexKernel, attend_with_padded_heads,
                                              check_flex_kernel, choose_flex_kernel, flash_head_padding)
from videoar_megatron.model.config import MaskConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.mask import dense_mask, draw_frame_visibility

HOPPER, BLACKWELL, AMPERE = (9, 0), (10, 0), (8, 0)


def qkv_and_mask(head_dim: int, heads: int = 4, kv_heads: int = 4):
    """float64 q, k, v (requiring grad) under a VideoAR mask with Random Frame Mask and a short caption."""
    layout = TokenLayout(4, ((1, 1), (2, 2), (3, 3)), 3)
    gen = torch.Generator().manual_seed(0)
    vis = draw_frame_visibility(2, layout.frames, p_mask=0.5, generator=torch.Generator().manual_seed(1))
    mask = dense_mask(layout.tables(), vis, torch.tensor([4, 2]))
    S = layout.seq_len
    q = torch.randn(2, heads, S, head_dim, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, S, head_dim, generator=gen, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(2, heads, S, head_dim, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v)], grad, mask


@pytest.mark.parametrize("head_dim,kv_heads", [(80, 4), (80, 2), (64, 4)], ids=["4B", "4B-gqa", "64"])
def test_padded_heads_equal_unpadded_attention_in_values_and_gradients(head_dim, kv_heads):
    """Zero-padding q/k/v to 128 with the real head dim's scale, then slicing, is the unpadded attention:
    output and q/k/v gradients (float64, to rounding). A kernel left at its default scale (1/sqrt(128))
    would not be: the control shows the comparison can tell."""
    (q, k, v), grad, mask = qkv_and_mask(head_dim, kv_heads=kv_heads)
    gqa = kv_heads != q.shape[1]

    def sdpa(q_, k_, v_, scale):
        return F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale, enable_gqa=gqa)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)  # scale 1/sqrt(head_dim)
    out = attend_with_padded_heads(sdpa, q, k, v, 128, head_dim ** -0.5)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    wrong = attend_with_padded_heads(lambda a, b, c, scale: sdpa(a, b, c, None), q, k, v, 128, head_dim ** -0.5)
    assert (wrong - ref).abs().max() > 1e-3


@pytest.mark.parametrize("capability,head_dim,pad", [
    (HOPPER, 80, 128), (HOPPER, 64, 128), (HOPPER, 96, 128),   # FA4's Hopper forward tiles 192 rows there
    (HOPPER, 97, None), (HOPPER, 128, None),                   # one BlockMask serves both passes
    (BLACKWELL, 80, None),
])
def test_flash_head_padding_only_where_hoppers_tiles_need_it(capability, head_dim, pad):
    assert flash_head_padding(capability, head_dim) == pad


STAGE3, UCF = 23059, 651


@pytest.mark.parametrize("setting,seq_len,head_dim,capability,blocker,want", [
    # auto: FLASH where it can run and the sequence is long enough, padded on Hopper below 97
    ("auto", STAGE3, 128, HOPPER, None, ("flash", None)),
    ("auto", STAGE3, 80, HOPPER, None, ("flash", 128)),
    ("auto", STAGE3, 80, BLACKWELL, None, ("flash", None)),
    ("auto", FLASH_MIN_TOKENS, 128, HOPPER, None, ("flash", None)),
    ("auto", FLASH_MIN_TOKENS - 1, 128, HOPPER, None, ("triton", None)),
    ("auto", UCF, 128, HOPPER, None, ("triton", None)),
    ("auto", STAGE3, 128, HOPPER, "flash-attn-4 ... is not installed", ("triton", None)),
    ("auto", STAGE3, 128, AMPERE, "needs a Hopper or newer GPU", ("triton", None)),
    # explicit settings are kept (an impossible flash was refused at build by check_flex_kernel)
    ("triton", STAGE3, 128, HOPPER, None, ("triton", None)),
    ("flash", UCF, 80, HOPPER, None, ("flash", 128)),
    ("flash", UCF, 128, HOPPER, None, ("flash", None)),
])
def test_auto_picks_the_fastest_valid_kernel_and_says_why(setting, seq_len, head_dim, capability, blocker, want):
    kernel = choose_flex_kernel(setting, seq_len, head_dim, capability, blocker)
    assert (kernel.name, kernel.pad_head_dim) == want
    assert kernel.reason.startswith("auto" if setting == "auto" else f"model.flex_kernel={setting}")
    if blocker and setting == "auto":
        assert blocker in kernel.reason
    if kernel.pad_head_dim:
        assert f"{head_dim} -> 128" in kernel.reason
    if setting == "auto" and kernel.name == "triton" and not blocker:
        assert f"{seq_len} tokens < {FLASH_MIN_TOKENS}" in kernel.reason


def test_auto_keeps_triton_under_context_parallelism_and_flash_stays_explicit():
    """FLASH has not run with context parallelism's query/key index tables: auto stays on Triton there and
    says so; an explicit flash is the user's to try."""
    kernel = choose_flex_kernel("auto", STAGE3, 128, HOPPER, None, context_parallel=True)
    assert kernel.name == "triton" and "context parallelism" in kernel.reason
    assert choose_flex_kernel("flash", STAGE3, 128, HOPPER, None, context_parallel=True).name == "flash"
    assert choose_flex_kernel("auto", STAGE3, 128, HOPPER, None, context_parallel=False).name == "flash"


def test_frame_table_masks_stay_on_triton_and_an_explicit_flash_is_refused():
    """FLASH crashed the CUDA context through the model whenever the mask read the Random Frame Mask's
    frame table (H100, session 10): auto keeps Triton under a window or a random drop and says why, an
    explicit flash is refused before building, naming the knobs; the full frame context keeps FLASH."""
    assert MaskConfig(rfm_window=4).reads_frame_table and MaskConfig(rfm_p_mask=0.1).reads_frame_table
    assert not MaskConfig().reads_frame_table and not MaskConfig(rfm_anchor_first=True).reads_frame_table
    kernel = choose_flex_kernel("auto", STAGE3, 80, HOPPER, None, frame_table=True)
    assert (kernel.name, kernel.pad_head_dim) == ("triton", None)
    assert "frame table" in kernel.reason and "rfm_window" in kernel.reason
    assert choose_flex_kernel("auto", STAGE3, 80, HOPPER, None, frame_table=False).name == "flash"
    with pytest.raises(ValueError, match=r"model\.flex_kernel=flash with model\.mask\.rfm_window > 0 or "
                                         r"model\.mask\.rfm_p_mask > 0: .*crashed.*set model\.flex_kernel=auto"):
        check_flex_kernel("flash", torch.device("cuda"), 128, frame_table=True)
    check_flex_kernel("flash", torch.device("cpu"), 128, frame_table=True)   # the CPU runs dense SDPA


def test_model_hands_the_chosen_kernel_to_its_attention(monkeypatch):
    """The model's flex kernel per layout follows the probe of its device (here a Hopper with FA4, faked:
    the choice only reads the capability and the blocker) and reaches AttentionInputs."""
    from tests.test_model_transformer import make_batch, make_cfg, model_of
    from tests.process_groups import single_process_groups
    import videoar_megatron.model.model as model_mod
    with single_process_groups() as groups:
        model = model_of(make_cfg(flex_kernel="auto", mask={"rfm_window": 0, "rfm_p_mask": 0.0}), groups)
        batch = make_batch(model.cfg)
        whole = slice(0, batch.layout.seq_len)
        # Built on the CPU: auto stays on triton whatever the length, saying why.
        on_cpu = model.flex_kernel_for(STAGE3)
        assert on_cpu.name == "triton" and "device cpu" in on_cpu.reason
        monkeypatch.setattr(model_mod, "flash_blocker", lambda device, head_dim: None)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: HOPPER)
        model.probe_kernels(torch.device("cuda"))
        assert model.flex_kernel_for(STAGE3) == choose_flex_kernel("auto", STAGE3, 16, HOPPER, None)
        assert model.flex_kernel_for(STAGE3).name == "flash"
        model.cfg.mask = MaskConfig(rfm_window=4)   # the mask now reads the frame table: Triton
        assert model.flex_kernel_for(STAGE3) == choose_flex_kernel("auto", STAGE3, 16, HOPPER, None, frame_table=True)
        model.cfg.mask = MaskConfig()
        model.always_split = True   # the one-rank context-parallel path
        assert model.flex_kernel_for(STAGE3).name == "triton"
        model.always_split = False
        assert model.attention_inputs(batch, whole, None).flex_kernel.name == "triton"   # a short layout
        model.cfg.flex_kernel = "flash"
        inputs = model.attention_inputs(batch, whole, None)
        assert inputs.flex_kernel.name == "flash" and inputs.flex_kernel.pad_head_dim == 128   # tiny: head_dim 16
