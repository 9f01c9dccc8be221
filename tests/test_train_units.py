"""Training pieces without a training run: layout checks name the knob, the FLOP count's attended
pairs equal the dense mask, per-sample randomness is layout independent, the LR schedule, the audit
replay, the host optimizer's TP-aware grad norm and its checkpoint format; FLOPs per sample pinned to a count from
the built model's weight shapes."""
from __future__ import annotations

import json
import math

import pytest
import torch

from tests.train_helpers import TINY_RECIPE
from videoar_common.config import ConfigError, build_dataclass, load_config
from videoar_megatron.model.config import ModelConfig
from videoar_megatron.model.layout import TokenLayout
from videoar_megatron.model.mask import dense_mask, draw_frame_visibility
from videoar_megatron.training.audit import consumed_samples
from videoar_megatron.training.config import TrainConfig
from videoar_megatron.model.sequence import concat_batches
from videoar_megatron.training.data import sample_seed
from videoar_megatron.training.metrics import attended_pairs, step_flops_per_sample


def tiny(*sets: str) -> TrainConfig:
    return load_config(TrainConfig, TINY_RECIPE, list(sets))


def test_layout_check_names_the_knobs():
    cfg = tiny("train.global_batch_size=8", "train.micro_batch_size=4")
    assert cfg.check_layout(2).accumulation == 1 and cfg.check_layout(1).accumulation == 2
    with pytest.raises(ValueError, match=r"train.global_batch_size=8 is not divisible by train.micro_batch_size "
                                         r"\(4\) x data-parallel size \(3"):
        cfg.check_layout(3)
    with pytest.raises(ValueError, match="world size 3 .* parallel.tensor_parallel \\(2\\)"):
        tiny("parallel.tensor_parallel=2").check_layout(3)
    with pytest.raises(ConfigError, match="num_attention_heads=4 .* parallel.tensor_parallel=3"):
        tiny("parallel.tensor_parallel=3")
    with pytest.raises(ConfigError, match="num_layers=2 is not divisible by parallel.pipeline_parallel=3"):
        tiny("parallel.pipeline_parallel=3")
    with pytest.raises(ValueError, match="2 micro-batches per step < parallel.pipeline_parallel=4"):
        tiny("model.num_layers=4", "parallel.pipeline_parallel=4").check_layout(4)
    vpp = ("model.num_layers=4", "parallel.pipeline_parallel=2", "parallel.virtual_pipeline_stages=2")
    assert tiny(*vpp, "train.micro_batch_size=2").check_layout(2).accumulation == 4  # 4 % PP = 0: fine
    with pytest.raises(ValueError, match=r"6 micro-batches per step.*is not a multiple of "
                                         r"parallel.pipeline_parallel=4, which parallel.virtual_pipeline_stages=2"):
        tiny("model.num_layers=8", "parallel.pipeline_parallel=4", "parallel.virtual_pipeline_stages=2",
             "train.global_batch_size=6", "train.micro_batch_size=1").check_layout(4)
    with pytest.raises(ConfigError, match=r"num_layers=2 is not divisible by parallel.pipeline_parallel=2 x "
                                          r"parallel.virtual_pipeline_stages=2"):
        tiny(*vpp[1:])
    with pytest.raises(ConfigError, match=r"virtual_pipeline_stages=2 needs parallel.pipeline_parallel > 1"):
        tiny("parallel.virtual_pipeline_stages=2")
    with pytest.raises(ConfigError, match=r"warmup_steps=500 must be below the LR schedule.s length, train.steps=300"):
        tiny("optim.warmup_steps=500")
    with pytest.raises(ConfigError, match="text_tokens needs caption token ids"):
        tiny("model.condition.kind=text_tokens")


@pytest.mark.parametrize("prefix,window,p_mask,anchor", [(1, 0, 0.0, False), (5, 2, 0.0, False),
                                                         (3, 0, 0.4, False), (2, 2, 0.0, True),
                                                         (2, 1, 0.4, True), (2, 0, 0.4, True)])
def test_attended_pairs_equal_the_dense_mask(prefix, window, p_mask, anchor):
    layout = TokenLayout.padded(prefix, ((1, 1), (2, 2), (3, 4)), 4, multiple=8)
    draws = 200 if p_mask else 1
    vis = draw_frame_visibility(draws, layout.frames, window=window, p_mask=p_mask, anchor_first=anchor,
                                generator=torch.Generator().manual_seed(0))
    mask = dense_mask(layout.tables(), vis, torch.full((draws,), prefix))
    pads = layout.pad * draws  # a pad sees itself only
    counted = (mask.sum().item() - pads) / draws
    expected = attended_pairs(layout, window, p_mask, anchor)
    assert math.isclose(counted, expected, rel_tol=0.02 if p_mask else 0.0), (counted, expected)


FLOP_CASES = {
    "tiny-class": {"size": "tiny", "latent_dim": 8},
    "gqa-text-features-rfm": {"size": "custom", "num_layers": 3, "hidden_size": 96, "num_attention_heads": 6,
                              "num_query_groups": 2, "ffn_hidden_size": 160, "latent_dim": 12,
                              "condition": {"kind": "text_features", "feature_dim": 24, "text_len": 5},
                              "mask": {"rfm_window": 2}},
}


@pytest.mark.parametrize("case", FLOP_CASES)
def test_step_flops_equal_a_count_from_the_built_models_weights_and_mask(case):
    """Counted independently: 2 FLOPs per multiply-add of every weight matrix of the built model, on
    the tokens it applies to (decoder matrices: every token; input projection and bit head: video
    tokens; text-feature projection: prefix tokens; embeddings are lookups), plus QKᵀ and AV over the
    pairs the dense mask allows (2 x 2 x head_dim per pair, head and layer), x 3 for forward + backward."""
    from tests.process_groups import single_process_groups
    from videoar_megatron.model.config import ParallelConfig
    from videoar_megatron.model.model import build_model
    cfg = build_dataclass(ModelConfig, FLOP_CASES[case])
    prefix = cfg.condition.text_len if cfg.condition.kind == "text_features" else cfg.condition.tokens_per_class
    layout = TokenLayout(prefix, ((1, 1), (2, 2), (3, 4)), 4)
    with single_process_groups() as groups:
        model = build_model(cfg, ParallelConfig(), groups)
    matrices = {name: m.weight.shape for name, m in model.named_modules()
                if not isinstance(m, torch.nn.Embedding) and getattr(m, "weight", None) is not None
                and m.weight.dim() == 2}
    applied_to = {"decoder.": layout.prefix_len + layout.video_len, "embedding.input_proj": layout.video_len,
                  "head": layout.video_len, "embedding.condition.feat_proj": layout.prefix_len}
    assert all(any(n.startswith(w) for w in applied_to) for n in matrices), sorted(matrices)
    macs = sum(out_f * in_f * next(n for where, n in applied_to.items() if name.startswith(where))
               for name, (out_f, in_f) in matrices.items())
    vis = draw_frame_visibility(1, layout.frames, window=cfg.mask.rfm_window, p_mask=0.0)
    pairs = int(dense_mask(layout.tables(), vis, torch.tensor([prefix])).sum())
    heads_dim = cfg.num_attention_heads * cfg.head_dim
    expected = 3 * (2 * macs + 2 * 2 * heads_dim * pairs * cfg.num_layers)
    assert step_flops_per_sample(cfg, layout) == expected


def test_per_sample_randomness_does_not_depend_on_the_batch_it_lands_in():
    from tokenizer.quantizer import MultiScaleBSQ
    from videoar_megatron.model.sequence import build_batch
    cfg = build_dataclass(ModelConfig, {"size": "tiny", "latent_dim": 8, "mask": {"rfm_window": 2, "rfm_p_mask": 0.3}})
    q = MultiScaleBSQ(dim=8, scales=[(1, 1), (2, 2)])
    latent = torch.randn(3, 8, 3, 2, 2, generator=torch.Generator().manual_seed(0))

    def one(i, step):
        gen = torch.Generator().manual_seed(sample_seed(7, step, f"id{i}"))
        return build_batch(q, cfg, latent_BdTHW=latent[i:i + 1], cond=torch.tensor([i]), training=True, generator=gen)

    batch = concat_batches([one(0, 5), one(1, 5), one(2, 5)])
    again = concat_batches([one(2, 5), one(0, 5)])
    torch.testing.assert_close(again.inputs_BNd[1], batch.inputs_BNd[0], rtol=0, atol=0)
    assert torch.equal(again.targets_BNd[0], batch.targets_BNd[2])
    assert torch.equal(again.flip_p_BTK[0], batch.flip_p_BTK[2])
    assert not torch.equal(one(0, 6).flip_p_BTK, batch.flip_p_BTK[:1])  # a new draw at another step
    assert sample_seed(1, 2, "x") == sample_seed(1, 2, "x") != sample_seed(1, 3, "x")


def test_lr_schedule_warms_up_then_decays_and_skips_do_not_advance_it():
    from videoar_megatron.training.optim import build_scheduler, current_lr, host_param_groups
    cfg = tiny("optim.lr=1.0", "optim.min_lr=0.1", "optim.warmup_steps=10", "train.steps=110")

    class Stub:
        param_groups = host_param_groups(torch.nn.Linear(2, 2), cfg.optim)

    opt = Stub()
    sched = build_scheduler(opt, cfg.optim, cfg.decay_steps)
    lrs = []
    for _ in range(110):
        lrs.append(current_lr(opt))
        sched.step(1)
    assert lrs[0] == 0.0 and math.isclose(lrs[5], 0.5) and math.isclose(lrs[10], 1.0)
    assert math.isclose(lrs[60], 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lrs[109] > 0.1 and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert [g["wd_mult"] for g in opt.param_groups] == [1.0, 0.0]  # the bias is not decayed


def test_audit_replay_drops_steps_of_a_crashed_job(tmp_path):
    lines = [{"start_step": 0, "resumed": False}] + [{"step": s, "ids": [[f"a{s}"]]} for s in (1, 2, 3, 4)]
    lines += [{"start_step": 2, "resumed": True}] + [{"step": s, "ids": [[f"b{s}"]]} for s in (3, 4, 5)]
    (tmp_path / "sample_ids.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n{\"step\": 6, \"id")
    assert consumed_samples(tmp_path) == {1: [["a1"]], 2: [["a2"]], 3: [["b3"]], 4: [["b4"]], 5: [["b5"]]}


def test_wall_clock_limit_is_a_stop_reason():
    import time

    from videoar_common.preemption import PreemptionConfig, PreemptionWatcher
    watcher = PreemptionWatcher(PreemptionConfig(time_limit_minutes=0.5), start_time=time.monotonic() - 31)
    assert watcher.local_reason() == "wall-clock limit of 0.5 min reached"
    assert PreemptionWatcher(PreemptionConfig(time_limit_minutes=0.5)).local_reason() is None


def test_async_saves_reuse_megatrons_cached_plan_and_each_holds_its_own_state(tmp_path):
    """Three asynchronous saves of one structure through one AsyncCheckpointer: from the third on,
    Megatron's cached save plan is reused (``cached_metadata``), and each committed checkpoint loads the
    values it was saved with (a stale cached plan or metadata would misplace or drop them)."""
    from megatron.core.dist_checkpointing import ShardedTensor
    from videoar_common.atomic import step_dir_name
    from videoar_common.distributed import init_distributed, shutdown_distributed
    from videoar_megatron.training import dist_ckpt

    def sharded(values):
        return {name: ShardedTensor.from_rank_offsets(name, tensor, replica_id=0) for name, tensor in values.items()}
    ctx = init_distributed(device="cpu")
    try:
        checkpointer = dist_ckpt.AsyncCheckpointer(ctx)
        saved = []
        for step in (1, 2, 3):
            values = {"w": torch.full((4, 3), float(step)), "b": torch.arange(5.0) * step}
            checkpointer.save(tmp_path, step, sharded(values), {"step": step})
            saved.append({k: v.clone() for k, v in values.items()})
            for v in values.values():
                v.add_(100.0)  # training goes on: the checkpoint must keep the values at its save
            checkpointer.wait()
        assert checkpointer.strategy.validated_cache_reuse
        for step, values in zip((1, 2, 3), saved):
            template = sharded({k: torch.zeros_like(v) for k, v in values.items()})
            loaded, train_state = dist_ckpt.load_checkpoint(tmp_path / step_dir_name(step), template)
            assert train_state["step"] == step
            for name, value in values.items():
                assert torch.equal(loaded[name], value), (step, name)
    finally:
        shutdown_distributed()


def test_the_async_worker_knob_names_itself_and_the_persistent_worker_needs_cuda():
    """checkpoint.async_worker: an unknown value is refused naming the knob and its choices; the
    persistent worker (which copies GPU memory it receives over CUDA IPC) is refused on a CPU run, saying
    what to set instead, before any save."""
    import dataclasses
    from videoar_common.distributed import DistContext
    from videoar_megatron.training import dist_ckpt
    from videoar_megatron.training.config import CheckpointConfig
    with pytest.raises(ValueError, match=r"checkpoint\.async_worker must be one of fork, persistent, got 'forked'"):
        CheckpointConfig(async_worker="forked")
    assert dataclasses.replace(CheckpointConfig(), async_worker="persistent").async_worker == "persistent"
    cpu = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                      backend="gloo")
    with pytest.raises(ValueError, match=r"checkpoint\.async_worker=persistent needs CUDA .*on cpu.*"
                                         r"set checkpoint\.async_worker=fork"):
        dist_ckpt.AsyncCheckpointer(cpu, worker="persistent")
    assert not dist_ckpt.AsyncCheckpointer(cpu).queue.persistent
