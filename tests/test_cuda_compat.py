"""The CUDA redirects are scoped (torch is unchanged outside each block, also after an exception), the
local engine's optimizer computes Megatron's norm and clip on host tensors with the right values and
uses the parameter groups Megatron's builder makes, and ``train.engine`` picks the engine or refuses a
combination that cannot run, naming the knob."""
from __future__ import annotations

import math

import pytest
import torch

from videoar_megatron.model.config import ParallelConfig
from videoar_megatron.training import cuda_compat
from videoar_megatron.training.engine import select_engine

CPU = torch.device("cpu")


def torch_attributes() -> dict:
    """What the redirects may touch, as the objects themselves (identity, not equality)."""
    return {"zeros": torch.zeros, "empty": torch.empty, "tensor": torch.tensor,
            "current_device": torch.cuda.current_device, "synchronize": torch.cuda.synchronize,
            "Tensor.type": vars(torch.Tensor).get("type"), "Tensor.cuda": vars(torch.Tensor).get("cuda")}


@pytest.mark.parametrize("scope", [cuda_compat.host_current_device, cuda_compat.host_allocations,
                                   cuda_compat.host_async_checkpointing, cuda_compat.emulated_cuda])
def test_a_redirect_is_gone_after_its_block_even_after_an_error(scope):
    before = torch_attributes()
    with pytest.raises(KeyError, match="inside"):
        with scope():
            assert torch_attributes() != before  # it did redirect something
            raise KeyError("inside")
    assert torch_attributes() == before
    assert not cuda_compat.cuda_emulated()


def test_redirects_inside_their_blocks():
    with cuda_compat.host_current_device():
        assert torch.cuda.current_device() == "cpu"
        assert torch.zeros(1, device="cpu").device == CPU  # untouched outside its own redirect
    with cuda_compat.host_allocations():
        for device in ("cuda", "cuda:0", torch.device("cuda")):
            assert torch.zeros(2, device=device).device == CPU
            assert torch.empty(2, device=device).device == CPU
            assert torch.tensor([1.0], device=device).device == CPU
        assert torch.ones(2).type() == "torch.cuda.FloatTensor"
        assert torch.ones(2).type(torch.float64).dtype == torch.float64  # a conversion is still one
    with cuda_compat.host_async_checkpointing():
        assert torch.cuda.current_device() == "cpu" and torch.cuda.synchronize() is None
        assert not cuda_compat.cuda_emulated()  # a production CPU run is not the CI emulation
        assert torch.zeros(1, device="cpu").device == CPU and torch.ones(2).type() == "torch.FloatTensor"
    with cuda_compat.emulated_cuda():
        assert cuda_compat.cuda_emulated()
        with cuda_compat.host_async_checkpointing():  # a save inside the emulation
            assert torch.cuda.synchronize() is None
        assert cuda_compat.cuda_emulated()
        t = torch.ones(2)
        assert t.cuda() is t and torch.cuda.synchronize() is None and torch.cuda.current_device() == "cpu"
        with cuda_compat.host_allocations():  # nested: the inner block restores the outer redirects
            pass
        assert torch.ones(1).type() == "torch.cuda.FloatTensor" and cuda_compat.cuda_emulated()


@pytest.fixture
def world_of_one():
    """torch.distributed and Megatron's parallel state for one process (TP = PP = DP = 1)."""
    from videoar_common.distributed import init_distributed, shutdown_distributed
    from videoar_megatron.model.parallel import destroy_model_parallel, init_model_parallel
    ctx = init_distributed(device="cpu")
    init_model_parallel(ctx, ParallelConfig())
    yield ctx
    destroy_model_parallel(ctx)
    shutdown_distributed()


def test_host_optimizer_clips_to_megatrons_norm_on_host_tensors(world_of_one):
    """Megatron's get_grad_norm_fp32 / clip_grad_by_total_norm_fp32 on CPU gradients: the norm over all
    gradients, clipped to max_norm; a norm under max_norm leaves the gradients alone."""
    from tests.train_helpers import TINY_RECIPE
    from videoar_common.config import load_config
    from videoar_megatron.training.config import TrainConfig
    from videoar_megatron.training.optim import build_host_optimizer, clip_to_norm
    cfg = load_config(TrainConfig, TINY_RECIPE, [])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    grads = [torch.randn(p.shape, generator=torch.Generator().manual_seed(i)) * 3 for i, p in
             enumerate(model.parameters())]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.clone()
    before = torch_attributes()
    opt = build_host_optimizer(model, cfg.optim)
    norm = opt.get_grad_norm()
    want = torch.cat([g.flatten() for g in grads]).double().norm().item()
    assert math.isclose(norm, want, rel_tol=1e-6), (norm, want)
    clip_to_norm(opt, 1.0, norm)
    for p, g in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, g / (want + 1e-6), rtol=1e-6, atol=0)
    assert math.isclose(opt.get_grad_norm(), 1.0, rel_tol=1e-5)
    clip_to_norm(opt, 10.0, 1.0)  # under the bound: untouched
    assert math.isclose(opt.get_grad_norm(), 1.0, rel_tol=1e-5)
    assert torch_attributes() == before  # every redirect closed again
    assert [g["wd_mult"] for g in opt.param_groups] == [1.0, 0.0]  # biases are not decayed


def test_engine_selection_names_the_knob():
    plain, pp2 = ParallelConfig(), ParallelConfig(pipeline_parallel=2)
    assert select_engine("auto", CPU, plain) == "local" and select_engine("local", CPU, plain) == "local"
    assert select_engine("auto", torch.device("cuda", 0), plain) == "megatron"
    with pytest.raises(ValueError, match=r"train.engine=megatron needs CUDA .* Use train.engine=auto or local"):
        select_engine("megatron", CPU, plain)
    with pytest.raises(ValueError, match=r"parallel.pipeline_parallel > 1 needs the Megatron engine"):
        select_engine("auto", CPU, pp2)
    with pytest.raises(ValueError, match=r"parallel.recompute=full needs CUDA"):
        select_engine("local", CPU, ParallelConfig(recompute="full"))
    with pytest.raises(ValueError, match=r"train.engine=local is the CPU engine"):
        select_engine("local", torch.device("cuda", 0), plain)
    with cuda_compat.emulated_cuda():
        assert select_engine("megatron", CPU, pp2) == "megatron"


def test_host_param_groups_are_megatrons(world_of_one):
    """The local engine's AdamW groups equal those Megatron's optimizer builder makes for the same model
    (its ``_get_param_groups``: same parameters per group, same fields), so both engines decay the same
    weights and the LR schedule reads the same group fields."""
    from megatron.core.optimizer import _get_param_groups
    from tests.train_helpers import TINY_RECIPE
    from videoar_common.config import load_config
    from videoar_megatron.model.model import build_model
    from videoar_megatron.training.config import TrainConfig
    from videoar_megatron.training.optim import host_param_groups, megatron_optimizer_config
    cfg = load_config(TrainConfig, TINY_RECIPE, [])
    model = build_model(cfg.model, cfg.parallel, world_of_one.groups, device=CPU)
    ours = host_param_groups(model, cfg.optim)
    theirs = _get_param_groups([model], megatron_optimizer_config(cfg.optim, bf16=False, distributed=False), None)
    assert len(ours) == len(theirs) == 2 and all(g["params"] for g in ours)
    for mine, megatron in zip(ours, theirs):
        assert [id(p) for p in mine["params"]] == [id(p) for p in megatron["params"]]
        assert {k: v for k, v in mine.items() if k != "params"} == {k: v for k, v in megatron.items() if k != "params"}
