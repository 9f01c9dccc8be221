"""Context parallelism at the model level: CP=2 (and TP=2+SP x CP=2) gives the unsplit model's loss and
gradients; the split deals every token once, balances attention work, and its pieces (work per query,
embeddings by position, the split loss) equal their unsplit definitions."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from videoar_common.config import build_dataclass
from videoar_megatron.model.config import LossConfig, ModelConfig, ParallelConfig
from videoar_megatron.model.context_parallel import attended_pairs_per_rank, rank_positions, row_work, sequence_multiple
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.mask import dense_mask, draw_frame_visibility
from videoar_megatron.training.metrics import attended_pairs

SCRIPTS = Path(__file__).parent / "dist_scripts"
GRAD_TOL = 1e-6
"""fp32: the split changes only the order of sums (keys gathered rank by rank, gradients summed over CP)."""


def check(out: Path, modes, ranks: int, tp: int) -> None:
    for mode in modes:
        for r in range(ranks):
            res = json.loads((out / f"{mode}_rank{r}.json").read_text())
            assert (res["tp"], res["cp"]) == (tp, 2), res
            assert res["local_video"] < res["video_len"], res      # the sequence really was split
            assert res["loss_rel_diff"] < GRAD_TOL, res
            assert res["metrics_max_diff"] < GRAD_TOL, res          # bit accuracy, per-scale losses
            assert res["grad_max_rel_diff"] < GRAD_TOL, res


def test_cp2_equals_cp1_in_loss_and_every_gradient_with_and_without_rfm_and_window(torchrun, tmp_path):
    modes = ("plain", "rfm_window", "text_weights")
    torchrun(SCRIPTS / "cp_parity.py", 2, tmp_path, "cpu", 1, *modes)
    check(tmp_path, modes, 2, 1)


def test_tp2_with_sequence_parallelism_times_cp2_equals_the_unsplit_model_on_four_ranks(torchrun, tmp_path):
    torchrun(SCRIPTS / "cp_parity.py", 4, tmp_path, "cpu", 2, "text_weights")
    check(tmp_path, ("text_weights",), 4, 2)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cp2_equals_cp1_with_flex_attention_on_nccl(torchrun, tmp_path):
    """The CUDA path: compiled FlexAttention with the query/key index tables' BlockMask, NCCL gathers."""
    modes = ("plain", "rfm_window", "text_weights")
    torchrun(SCRIPTS / "cp_parity.py", 2, tmp_path, "cuda", 1, *modes)
    check(tmp_path, modes, 2, 1)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 4, reason="needs 4 GPUs")
def test_tp2_with_sequence_parallelism_times_cp2_equals_the_unsplit_model_on_four_gpus(torchrun, tmp_path):
    """Issue 27's CP=2 x TP=2 layout on NCCL: sequence-parallel norms, GQA and the gathered keys/values."""
    torchrun(SCRIPTS / "cp_parity.py", 4, tmp_path, "cuda", 2, "text_weights")
    check(tmp_path, ("text_weights",), 4, 2)


# --- the split ------------------------------------------------------------------------------------

def random_layout(rng: random.Random, multiple: int) -> TokenLayout:
    scales, h, w = [], 1, 1
    for _ in range(rng.randint(1, 4)):
        scales.append((h, w))
        h, w = h + rng.randint(0, 2), w + rng.randint(0, 2)
    return TokenLayout.padded(rng.choice([0, 1, 4]), scales, rng.randint(1, 5), multiple)


def test_work_per_query_is_the_dense_masks_row_sum():
    rng = random.Random(0)
    for _ in range(20):
        layout, window = random_layout(rng, rng.choice([1, 4])), rng.choice([0, 1, 2])
        vis = draw_frame_visibility(1, layout.frames, window=window)
        want = dense_mask(layout.tables(), vis, torch.tensor([layout.prefix_len])).sum(-1).flatten()
        assert torch.equal(row_work(layout, window), want), (layout, window)


def test_every_token_goes_to_exactly_one_rank_in_equal_shares():
    rng = random.Random(1)
    for _ in range(20):
        cp, chunk = rng.choice([2, 3, 4]), rng.choice([1, 2, 5])
        layout = random_layout(rng, cp * chunk)
        positions = rank_positions(layout, cp, chunk, rng.choice([0, 1]))
        assert len({len(p) for p in positions}) == 1
        assert all(torch.equal(p, p.sort().values) for p in positions)      # each rank ascending
        assert torch.equal(torch.cat(positions).sort().values, torch.arange(layout.seq_len))


@pytest.mark.parametrize("window,p_mask", [(0, 0.0), (2, 0.0), (0, 0.3)])
def test_attended_pairs_per_rank_add_up_to_the_whole_masks_count(window, p_mask):
    """Cross-check with the FLOP accounting's closed form (pads see themselves, one pair each)."""
    layout = TokenLayout.padded(5, ((1, 1), (2, 3), (4, 6)), 6, multiple=2 * 16)
    pairs = attended_pairs_per_rank(layout, 2, 16, window)
    assert sum(pairs) == attended_pairs(layout, window) + layout.pad


STAGE3_SCHEDULE = ((1, 1), (2, 3), (4, 7), (8, 14), (12, 21), (16, 28), (20, 35), (24, 42))


@pytest.mark.parametrize("frames", [9, 17, 33], ids=["33f", "65f", "129f"])
@pytest.mark.parametrize("window", [0, 4])
@pytest.mark.parametrize("cp", [2, 4, 8])
def test_stage3_layouts_are_balanced_within_ten_percent(frames, window, cp):
    """Stage III at 384x672 (64 caption tokens, 8 scales, 2,555 tokens per latent frame) with the
    default 128-token chunks: max/min attended pairs per rank <= 1.1, with and without a Random Frame
    Mask window (head-tail chunks reach 1.4-1.9 with w = 4: docs/training.md)."""
    parallel = ParallelConfig(context_parallel=cp, tensor_parallel=2, sequence_parallel=True)
    layout = TokenLayout.padded(64, STAGE3_SCHEDULE, frames, sequence_multiple(parallel))
    pairs = attended_pairs_per_rank(layout, cp, parallel.context_parallel_chunk, window)
    assert max(pairs) / min(pairs) <= 1.1, pairs


def test_a_contiguous_split_would_fail_the_balance_bound():
    """The bound above can fail: dealing chunks in sequence order leaves the last rank with most work."""
    layout = TokenLayout.padded(64, STAGE3_SCHEDULE, 9, 2 * 128)
    work = row_work(layout).view(2, -1).sum(-1)
    assert work.max() / work.min() > 1.5


def test_sequence_multiple_keeps_every_share_divisible_by_tp_under_sequence_parallelism():
    for tp, cp, chunk, sp in [(2, 2, 3, True), (4, 2, 128, True), (2, 1, 128, True), (1, 4, 5, False)]:
        parallel = ParallelConfig(tensor_parallel=tp, context_parallel=cp, context_parallel_chunk=chunk,
                                  sequence_parallel=sp)
        multiple = sequence_multiple(parallel)
        assert multiple % (cp * chunk if cp > 1 else 1) == 0
        assert (multiple // cp) % (tp if sp else 1) == 0


# --- pieces by position ----------------------------------------------------------------------------

def test_embeddings_at_positions_equal_the_sequence_forward():
    from tests.process_groups import single_process_groups
    from videoar_megatron.model.model import build_model
    from videoar_megatron.model.sequence import build_batch
    from tokenizer.quantizer import MultiScaleBSQ
    cfg = build_dataclass(ModelConfig, {"size": "tiny", "latent_dim": 8,
                                        "condition": {"kind": "text_features", "text_len": 3, "feature_dim": 6}})
    q = MultiScaleBSQ(dim=8, scales=[(1, 1), (2, 2)])
    batch = build_batch(q, cfg, latent_BdTHW=torch.randn(2, 8, 3, 2, 2), cond=torch.randn(2, 3, 6),
                        text_len_B=torch.tensor([3, 1]), training=True, generator=torch.Generator().manual_seed(0),
                        pad_to_multiple=8)
    with single_process_groups() as groups:
        emb = build_model(cfg, ParallelConfig(), groups).embedding
        tables = batch.layout.tables()
        whole = emb(batch, tables, slice(0, batch.layout.seq_len))
        order = torch.randperm(batch.layout.seq_len, generator=torch.Generator().manual_seed(1))
        assert batch.layout.pad and torch.equal(emb.at_positions(batch, tables, order), whole[order])


def test_a_split_loss_adds_up_to_the_unsplit_one_for_any_token_weights():
    """Each share divides by the whole sequence's weight sum: with non-uniform weights (reweighting x
    explicit scale weights) the shares' losses, bit accuracies and per-scale terms sum to the unsplit ones,
    and their gradients sum to its gradient."""
    layout = TokenLayout(2, ((1, 1), (2, 2), (3, 3)), 3)
    cfg = LossConfig(scale_weighting="infinitystar", scale_reweight=1, max_reweight=5.0, scale_weights=[3.0, 1.0, 0.25])
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, layout.video_len, 4, generator=gen, requires_grad=True)
    targets = torch.rand(2, layout.video_len, 4, generator=gen) > 0.5
    whole = bit_loss(logits, targets, layout, cfg)
    (grad_whole,) = torch.autograd.grad(whole.loss, logits)
    shares = torch.randperm(layout.video_len, generator=gen).chunk(3)
    parts = [bit_loss(logits[:, idx], targets, layout, cfg, video_index_n=idx) for idx in shares]
    grads = torch.autograd.grad(sum(p.loss for p in parts), logits)[0]
    torch.testing.assert_close(sum(p.loss for p in parts), whole.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum(p.bit_accuracy for p in parts), whole.bit_accuracy, rtol=1e-6, atol=0)
    torch.testing.assert_close(sum(p.per_scale_loss_K for p in parts), whole.per_scale_loss_K, rtol=1e-6, atol=0)
    torch.testing.assert_close(grads, grad_whole, rtol=1e-6, atol=1e-9)


# --- GPU (FlexAttention): run with `pytest -m gpu` on a GPU host -------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_flex_with_query_and_key_index_tables_equals_dense_sdpa_on_gpu(dtype, tol):
    """A CP rank's compiled FlexAttention: its 128-token chunks of queries against keys in the gathered
    (rank after rank) order, BlockMask from the tabled rule, equals SDPA under the same rows and columns
    of the dense mask, in output and gradients; with a Random Frame Mask window and drop."""
    from videoar_megatron.model.attention import FLEX_KERNEL_OPTIONS
    from videoar_megatron.model.mask import block_mask, compiled_flex_attention
    layout = TokenLayout.padded(8, ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)), 5, multiple=2 * 128)
    tables = layout.tables("cuda")
    vis = draw_frame_visibility(2, layout.frames, window=3, p_mask=0.3, generator=torch.Generator().manual_seed(0),
                                device="cuda")
    text_len = torch.tensor([8, 3], device="cuda")
    positions = [p.cuda() for p in rank_positions(layout, 2, 128, 3)]
    q_pos, kv_pos = positions[1], torch.cat(positions)
    gen = torch.Generator("cuda").manual_seed(0)
    q = torch.randn(2, 4, len(q_pos), 64, device="cuda", generator=gen, dtype=dtype).requires_grad_()
    k, v = (torch.randn(2, 4, layout.seq_len, 64, device="cuda", generator=gen, dtype=dtype).requires_grad_()
            for _ in range(2))
    grad_out = torch.randn_like(q)
    bm = block_mask(tables, vis, text_len, q_positions=q_pos, kv_positions=kv_pos)
    out = compiled_flex_attention()(q, k, v, block_mask=bm, kernel_options=FLEX_KERNEL_OPTIONS["triton"])
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=dense_mask(tables, vis, text_len, q_positions=q_pos, kv_positions=kv_pos))
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad_out), torch.autograd.grad(ref, (q, k, v), grad_out)):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.mark.gpu
def test_the_one_rank_split_path_equals_the_plain_path_on_gpu():
    """What benchmarks/bench_ar_cp.py times at CP=1: the split machinery (embeddings by position, tabled
    BlockMask, gather no-op, head and loss on index lists) computes the plain path's logits and gradients."""
    from tests.process_groups import single_process_groups
    from tokenizer.quantizer import MultiScaleBSQ
    from videoar_megatron.model.model import build_model
    from videoar_megatron.model.sequence import build_batch
    from videoar_megatron.training.engine import micro_batch_loss
    cfg = build_dataclass(ModelConfig, {"size": "tiny", "latent_dim": 16, "attention_backend": "flex",
                                        "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}})
    q = MultiScaleBSQ(dim=16, scales=((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8)))
    batch = build_batch(q, cfg, latent_BdTHW=torch.randn(2, 16, 5, 8, 8, device="cuda"), cond=torch.tensor([3, 4]),
                        training=True, generator=torch.Generator("cuda").manual_seed(0))
    with single_process_groups("cuda") as groups:
        torch.manual_seed(0)
        model = build_model(cfg, ParallelConfig(), groups, device="cuda")
        results = []
        for split in (False, True):
            model.always_split = split
            model.zero_grad()
            out = micro_batch_loss(model, model(batch), batch, cfg.loss)
            out.loss.backward()
            results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (split_loss, split_grads) = results
    torch.testing.assert_close(split_loss, plain_loss, atol=1e-5, rtol=1e-5)
    for name in plain_grads:
        torch.testing.assert_close(split_grads[name], plain_grads[name], atol=1e-4, rtol=1e-3, msg=name)
