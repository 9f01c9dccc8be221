"""GPU promises (run with `make test-gpu`): FlexAttention equals the dense SDPA path (Triton kernels, and
the FlashAttention-4 backend of ``model.flex_kernel=flash`` where flash-attn-4 is installed, with heads
below 97 zero-padded on Hopper); ``model.flex_kernel=auto`` picks what this GPU can run; PP=2 equals
PP=1.

On a CPU host these are skipped. The FlexAttention mask itself is checked against the brute-force
reference on CPU (tests/test_model_mask.py), and its forward through eager flex; here the compiled
CUDA kernel and its backward are compared with SDPA on the dense mask from the same rule.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.attention import (FLASH_MIN_TOKENS, FLEX_KERNEL_OPTIONS, AttentionInputs,
                                              check_flex_kernel, choose_flex_kernel, flash_head_padding,
                                              flash_installed, flash_unsupported, videoar_attention)
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.mask import block_mask, compiled_flex_attention, dense_mask, draw_frame_visibility
from tests.process_groups import single_process_groups

pytestmark = pytest.mark.gpu
SCRIPTS = Path(__file__).parent / "dist_scripts"
UCF_SCALES = ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))  # 130 tokens per latent frame
FA4_BLOCK_SIZE_ERROR = (r"(?is)block size \d+.*must be a multiple of \d+"
                        r"|block sparsity requires sparse_block_size\[\d\]=\d+ to match tile_n")
"""FA4 4.0's messages where the BlockMask's blocks do not fit its Hopper tiles (seen on an H200: "Block
sparse tensors forward have block size 128, which must be a multiple of 192"; on an H100 in session 10,
head_dim 80: "Block sparsity requires sparse_block_size[1]=144 to match tile_n", docs/BENCHMARKS.md)."""
FLASH_FRAME_TABLE_CRASH_SIGNATURE = (r"operation not supported on global/shared address space"
                                     r"|cudaErrorInvalidAddressSpace|CUBLAS_STATUS_EXECUTION_FAILED")
"""How the crash of FLASH with the frame table showed (H100, session 10): the kernel's invalid address
space error, surfacing at the next cuBLAS call after the attention."""


def ucf_case(batch=2, frames=5, prefix=8, rfm=True):
    layout = TokenLayout(prefix, UCF_SCALES, frames)
    tables = layout.tables("cuda")
    vis = draw_frame_visibility(batch, frames, window=3 if rfm else 0, p_mask=0.3 if rfm else 0.0,
                                generator=torch.Generator().manual_seed(0), device="cuda")
    text_len = torch.tensor([prefix, 3], device="cuda")[:batch]
    return layout, tables, vis, text_len


def attention_inputs(B, S, dtype, heads=4, head_dim=64, device="cuda"):
    """Seeded q, k, v (requiring grad) and an output gradient, each ``(B, heads, S, head_dim)``."""
    gen = torch.Generator(device).manual_seed(0)
    q, k, v = (torch.randn(B, heads, S, head_dim, device=device, generator=gen, dtype=dtype).requires_grad_()
               for _ in range(3))
    return q, k, v, torch.randn(B, heads, S, head_dim, device=device, generator=gen, dtype=dtype)


def assert_equals_dense_sdpa(attend, tables, vis, text_len, dtype, tol, heads=4, head_dim=64, device="cuda"):
    """``attend(q, k, v)`` equals SDPA under the whole dense mask, in its output and its q/k/v gradients."""
    q, k, v, grad_out = attention_inputs(vis.shape[0], tables.kind_S.shape[0], dtype, heads, head_dim, device)
    out = attend(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(tables, vis, text_len))
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad_out)
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def skip_without_flash() -> None:
    try:
        check_flex_kernel("flash", torch.device("cuda"))
    except ValueError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("rfm", [True, False], ids=["rfm", "full-context"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_flex_attention_output_and_grads_equal_dense_sdpa(dtype, tol, rfm):
    layout, tables, vis, text_len = ucf_case(rfm=rfm)
    bm = block_mask(tables, vis, text_len)
    options = FLEX_KERNEL_OPTIONS["triton"]
    assert_equals_dense_sdpa(lambda q, k, v: compiled_flex_attention()(q, k, v, block_mask=bm, kernel_options=options),
                             tables, vis, text_len, dtype, tol)


@pytest.mark.parametrize("rfm", [True, False], ids=["rfm", "full-context"])
@pytest.mark.parametrize("head_dim", [64, 80, 128])  # 80: VideoAR-4B; 128: L and XL
def test_flash_kernel_equals_dense_sdpa_with_heads_padded_where_needed(head_dim, rfm):
    """model.flex_kernel=flash (FA4, bf16 only) through the model's attention path: output and gradients
    equal dense SDPA at every head dim the model sizes use; on Hopper 64 and 80 run zero-padded to 128
    with their own softmax scale (the reference is unpadded SDPA at 1/sqrt(head_dim))."""
    skip_without_flash()
    capability = torch.cuda.get_device_capability()
    if flash_unsupported(capability, head_dim):
        pytest.skip(flash_unsupported(capability, head_dim))
    layout, tables, vis, text_len = ucf_case(rfm=rfm)
    kernel = choose_flex_kernel("flash", layout.seq_len, head_dim, capability, None)
    assert kernel.name == "flash" and kernel.pad_head_dim == flash_head_padding(capability, head_dim)
    if capability[0] == 9:
        assert (kernel.pad_head_dim == 128) == (head_dim < 97)
    inputs = AttentionInputs(block_mask=block_mask(tables, vis, text_len), flex_kernel=kernel)
    assert_equals_dense_sdpa(lambda q, k, v: videoar_attention(q, k, v, inputs, scale=head_dim ** -0.5),
                             tables, vis, text_len, torch.bfloat16, 2e-2, head_dim=head_dim)


@pytest.mark.parametrize("head_dim", [64, 80])
def test_unpadded_fa4_fails_where_heads_are_padded(head_dim):
    """Where the model pads heads for FA4 (Hopper, head_dim < 97), FA4 without the padding really fails
    for the reason given (its block-size tiling), in the kernel call: the padding is not a guess."""
    skip_without_flash()
    if flash_head_padding(torch.cuda.get_device_capability(), head_dim) is None:
        pytest.skip("this GPU trains the head dim unpadded")
    layout, tables, vis, text_len = ucf_case(rfm=False)
    bm = block_mask(tables, vis, text_len)
    q, k, v, grad_out = attention_inputs(vis.shape[0], tables.kind_S.shape[0], torch.bfloat16, head_dim=head_dim)
    torch._dynamo.reset()  # the failed compile must not be cached for the next case
    with pytest.raises(Exception, match=FA4_BLOCK_SIZE_ERROR):
        out = compiled_flex_attention()(q, k, v, block_mask=bm, kernel_options=FLEX_KERNEL_OPTIONS["flash"])
        torch.autograd.grad(out, (q, k, v), grad_out)
    torch._dynamo.reset()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_split_attention_output_and_grads_equal_dense_sdpa(dtype, tol):
    """Large blocks through SDPA without a mask (flash kernels) + the rest through compiled Flex on a
    query subset, with a padded caption, equals SDPA under the whole dense mask."""
    from videoar_megatron.model.attention import AttentionInputs, split_plan, videoar_attention
    layout = TokenLayout(8, ((1, 1), (2, 3), (4, 7), (8, 14), (12, 21)), 3)   # blocks of 112 and 252 tokens
    tables = layout.tables("cuda")
    vis = draw_frame_visibility(2, layout.frames, device="cuda")
    text_len = torch.tensor([8, 3], device="cuda")
    plan = split_plan(layout, 100, "cuda")
    assert len(plan.blocks) == 2 * layout.frames
    inputs = AttentionInputs(split=plan, text_len=(8, 3),
                             block_mask=block_mask(tables, vis, text_len, full_context=True, q_positions=plan.rest_S))
    assert_equals_dense_sdpa(lambda q, k, v: videoar_attention(q, k, v, inputs, scale=64 ** -0.5),
                             tables, vis, text_len, dtype, tol)


@pytest.fixture(scope="module")
def groups():
    with single_process_groups("cuda") as g:
        yield g


def test_model_with_flex_equals_model_with_sdpa(groups):
    from videoar_megatron.model.model import build_model
    from videoar_megatron.model.sequence import build_batch
    cfg = build_dataclass(ModelConfig, {"size": "tiny", "latent_dim": 16, "attention_backend": "flex",
                                        "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}})
    q = MultiScaleBSQ(dim=16, scales=UCF_SCALES)
    latent = torch.randn(2, 16, 5, 8, 8, device="cuda")
    batch = build_batch(q, cfg, latent_BdTHW=latent, cond=torch.tensor([3, 4]), training=True,
                        generator=torch.Generator("cuda").manual_seed(0))
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, device="cuda")
    results = []
    for backend in ("flex", "sdpa"):
        model.cfg = dataclasses.replace(cfg, attention_backend=backend)
        model.zero_grad()
        logits = model(batch)
        bit_loss(logits, batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (flex_logits, flex_grads), (sdpa_logits, sdpa_grads) = results
    torch.testing.assert_close(flex_logits, sdpa_logits, atol=1e-4, rtol=1e-4)
    for name in flex_grads:
        torch.testing.assert_close(flex_grads[name], sdpa_grads[name], atol=1e-4, rtol=1e-3, msg=name)


def test_auto_kernel_choice_follows_this_gpu(groups):
    """model.flex_kernel=auto (the default) on this GPU: FLASH at stage-III length exactly where FA4 is
    installed and can train the head dim (padded or not), Triton at UCF-101 length and without FA4."""
    from videoar_megatron.model.model import build_model
    for size, head_dim in (("tiny", 16), ("custom", 80)):
        dims = {} if size == "tiny" else {"num_layers": 1, "hidden_size": 320, "num_attention_heads": 4}
        cfg = build_dataclass(ModelConfig, {"size": size, **dims, "latent_dim": 16})
        assert cfg.flex_kernel == "auto" and cfg.head_dim == head_dim
        model = build_model(cfg, ParallelConfig(), groups, device="cuda")
        can_flash = flash_installed() and flash_unsupported(torch.cuda.get_device_capability(), head_dim) is None
        long, short = model.flex_kernel_for(23059), model.flex_kernel_for(651)
        print(f"head_dim {head_dim}: 23,059 tokens -> {long}; 651 -> {short}")
        assert long.name == ("flash" if can_flash else "triton") and short.name == "triton", (long, short)
        assert (long.pad_head_dim is not None) == (can_flash and torch.cuda.get_device_capability()[0] == 9
                                                   and head_dim < 97)
        assert str(FLASH_MIN_TOKENS) in short.reason or "unavailable" in short.reason


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_4b_heads_through_the_model_flash_equals_sdpa(groups):
    """VideoAR-4B's head dim (80) through the whole model, bf16: model.flex_kernel=flash (padded heads on
    Hopper) against the dense SDPA path, logits and every gradient within bf16 rounding (relative L2;
    a wrong softmax scale moves them by tens of percent). The full frame context: FLASH is refused with
    the Random Frame Mask's frame table (next test)."""
    skip_without_flash()
    from videoar_megatron.model.model import build_model
    from videoar_megatron.model.sequence import build_batch
    cfg = build_dataclass(ModelConfig, {"size": "custom", "num_layers": 2, "hidden_size": 320,
                                        "num_attention_heads": 4, "latent_dim": 16, "flex_kernel": "flash",
                                        "attention_backend": "flex", "mask": {"rfm_window": 0, "rfm_p_mask": 0.0}})
    q = MultiScaleBSQ(dim=16, scales=UCF_SCALES)
    batch = build_batch(q, cfg, latent_BdTHW=torch.randn(2, 16, 5, 8, 8, device="cuda"), cond=torch.tensor([3, 4]),
                        training=True, generator=torch.Generator("cuda").manual_seed(0))
    torch.manual_seed(0)
    model = build_model(cfg, ParallelConfig(), groups, device="cuda", params_dtype=torch.bfloat16)
    kernel = model.flex_kernel_for(batch.layout.seq_len)
    assert kernel.name == "flash" and kernel.pad_head_dim == flash_head_padding(torch.cuda.get_device_capability(), 80)
    results = []
    for backend in ("flex", "sdpa"):
        model.cfg = dataclasses.replace(cfg, attention_backend=backend)
        model.zero_grad()
        logits = model(batch)
        bit_loss(logits.float(), batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
        results.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (flash_logits, flash_grads), (sdpa_logits, sdpa_grads) = results
    assert rel_l2(flash_logits, sdpa_logits) < 1e-2
    for name in flash_grads:
        assert rel_l2(flash_grads[name], sdpa_grads[name]) < 3e-2, name


def test_flash_with_the_frame_table_still_crashes_in_the_model():
    """The sentinel of FLASH_FRAME_TABLE_CRASH (videoar_megatron/model/attention.py): FLASH through the
    model on a batch whose mask reads the Random Frame Mask's frame table, in its own process
    (tests/dist_scripts/flash_frame_table.py), still crashes the CUDA context. When this test fails
    because the script ran, the index tables' slack (layout.INDEX_SLACK, the suspected cause: FA4 reading
    them past the sequence end) or a release fixed it: check that ``--poison-slack`` still crashes, check
    flash against SDPA through the model with the frame table (the test above with the mask on), then
    lift the refusal in check_flex_kernel and choose_flex_kernel's Triton rule, and re-measure stage III."""
    skip_without_flash()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, str(SCRIPTS / "flash_frame_table.py")], capture_output=True,
                         text=True, timeout=600, env=env)
    out = run.stdout + run.stderr
    assert run.returncode != 0, ("FLASH ran the model with the frame table: lift FLASH_FRAME_TABLE_CRASH's "
                                 "refusal after checking it against SDPA\n" + out[-2000:])
    assert "frame table read: True" in out and "flex kernel: flash" in out, out[-3000:]
    assert re.search(FLASH_FRAME_TABLE_CRASH_SIGNATURE, out), out[-3000:]


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_pp2_equals_pp1(torchrun, tmp_path):
    torchrun(SCRIPTS / "pp_parity.py", 2, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    last = next(r for r in results if r["pp_rank"] == 1)
    assert len(last["losses"]) == 2
    for got, want in zip(last["losses"], last["ref_losses"]):
        assert abs(got - want) < 1e-5, last
    for r in results:
        assert r["grad_max_rel_diff"] < 1e-4, r
