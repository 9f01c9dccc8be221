"""Tokenizer training's data parallelism through the public CLI (`videoar tokenizer train` under
torchrun, gloo): 2 ranks train what 1 rank trains with the same global batch, and ZeRO-1 trains what
ZeRO-2 trains.

Why the runs can agree: a rank's clip stream is every world-th entry of a seeded permutation and each
clip's start is seeded by (seed, epoch, index), so at 1 clip per micro-batch, DP=1 with 2 accumulation
steps and DP=2 with 1 see the same clips in the same micro-batches (per-micro-batch statistics such
as the quantizer's codebook entropy included). The corpus has no bad videos (a reject would shift one
rank's stream). The run includes GAN steps (LeCAM).

Tolerance. The gradients themselves agree bit for bit: DP averages two ranks' gradients in an
all-reduce where DP=1 adds two micro-batches scaled by 1/2, and ZeRO-2 reduce-scatters gradients into
partitions where ZeRO-1 all-reduces them; with two addends the order cannot matter (a + b = b + a in
floating point) and halving is exact in binary. The gradient norm is another matter: DeepSpeed sums
the squares per ZeRO partition and then over ranks, so its summation order follows the number of
partitions, and DP=1 (one partition) and DP=2 (two) may differ in the last bit; with clipping on, that
bit reaches the weights through the clip coefficient. Measured: DP=1 vs DP=2 differ by at most 7.6e-8
relative (the gradient norm at step 5; the exported weights by up to 4.1e-8), so they are held to 1e-6;
ZeRO-1 vs ZeRO-2 (two partitions both) were identical in every run and are held to exactly equal. (With more ranks or accumulation steps the gradient sum order would change too
and ~1e-5 would be needed.) A rank reading the other rank's clips, a gradient left unreduced
or a partition updated from the wrong slice changes the first step's loss or the weights by far more
than rounding: another data seed, the control below, differs by more than 1e-3.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_tokenizer_train import corpus, losses, torchrun, write_recipe  # noqa: F401 (corpus: fixture)

pytestmark = pytest.mark.slow
TERMS = ("g_total", "rec", "commit", "entropy", "psnr", "grad_norm", "d_total", "lecam", "gan_g", "lr")


def train(tmp_path: Path, corpus: Path, name: str, nproc: int, zero_stage: int) -> Path:  # noqa: F811
    recipe = write_recipe(tmp_path / f"{name}.yaml", corpus, steps=5, global_batch_size=2,
                          data__micro_batch_size=1, deepspeed__zero_stage=zero_stage, loss__disc_start_step=3,
                          checkpoint__every=5, eval__manifest="",
                          data__manifest=str(corpus / "train" / "metadata.csv"))
    run = tmp_path / name
    torchrun(run, recipe, nproc=nproc)
    return run


def max_rel_diff(a: Path, b: Path) -> tuple[float, str]:
    """Largest relative difference over the logged terms of every step and the exported weights
    (0.0 only if all are bitwise equal)."""
    from tokenizer.checkpoint import load_tokenizer
    worst, where = 0.0, ""
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == [1, 2, 3, 4, 5]
    assert "d_total" in la[5] and "d_total" in lb[5]   # the GAN was on
    for step in la:
        for key in TERMS:
            x, y = la[step].get(key), lb[step].get(key)
            assert (x is None) == (y is None), (step, key)
            if x is not None and x != y:
                rel = abs(x - y) / max(abs(x), abs(y))
                worst, where = max((worst, where), (rel, f"step {step} {key}"))
    wa = load_tokenizer(a / "tokenizer").state_dict()
    wb = load_tokenizer(b / "tokenizer").state_dict()
    for key in wa:
        if not torch.equal(wa[key], wb[key]):
            rel = ((wa[key] - wb[key]).norm() / wa[key].norm().clamp_min(1e-12)).item()
            worst, where = max((worst, where), (rel, f"weight {key}"))
    return worst, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):  # noqa: F811
    root = tmp_path_factory.mktemp("tok_parallel")
    return {"dp1": train(root, corpus, "dp1", 1, 1), "dp2_zero1": train(root, corpus, "dp2_zero1", 2, 1),
            "dp2_zero2": train(root, corpus, "dp2_zero2", 2, 2)}


@pytest.mark.parametrize("a,b,rtol", [("dp1", "dp2_zero1", 1e-6), ("dp1", "dp2_zero2", 1e-6),
                                      ("dp2_zero1", "dp2_zero2", 0.0)],
                         ids=["dp2-equals-dp1-zero1", "dp2-equals-dp1-zero2", "zero1-equals-zero2"])
def test_layouts_train_the_same_tokenizer(runs, a, b, rtol):
    worst, where = max_rel_diff(runs[a], runs[b])
    print(f"\n{a} vs {b}: max relative difference {worst:.2e} at {where}")
    assert worst <= rtol, f"{a} vs {b}: {worst:.2e} at {where}"


def test_the_comparison_sees_a_different_run(runs, tmp_path, corpus):  # noqa: F811
    """The check has teeth: another data seed (other clips, same everything else) is far outside it."""
    recipe = write_recipe(tmp_path / "other.yaml", corpus, steps=5, global_batch_size=2, data__micro_batch_size=1,
                          loss__disc_start_step=3, checkpoint__every=5, eval__manifest="", data__seed=1,
                          data__manifest=str(corpus / "train" / "metadata.csv"))
    torchrun(tmp_path / "other", recipe, nproc=1)
    worst, where = max_rel_diff(runs["dp1"], tmp_path / "other")
    print(f"\nanother data seed: max relative difference {worst:.2e} at {where}")
    assert worst > 1e-3, (worst, where)
