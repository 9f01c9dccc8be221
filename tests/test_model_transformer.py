"""VideoARModel on Megatron-core (CPU, one process): loss/grad, causality, conditioning, stages, sizes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tokenizer.quantizer import MultiScaleBSQ
from videoar_common.config import build_dataclass
from videoar_megatron.model.config import ModelConfig, ParallelConfig
from videoar_megatron.model.loss import bit_loss
from videoar_megatron.model.model import build_model
from videoar_megatron.model.params import count_parameters, parameter_report
from videoar_megatron.model.sequence import build_batch
from tests.process_groups import single_process_groups

D = 8
SCALES = [(1, 1), (2, 2), (3, 3)]


@pytest.fixture(scope="module")
def groups():
    with single_process_groups() as g:
        yield g


def make_cfg(**over) -> ModelConfig:
    raw = {"size": "tiny", "latent_dim": D, "mask": {"rfm_window": 0, "rfm_p_mask": 0.3}}
    raw.update(over)
    return build_dataclass(ModelConfig, raw)


def make_batch(cfg, *, frames=3, batch=2, training=True, seed=0, cond=None, **kw):
    q = MultiScaleBSQ(dim=D, scales=SCALES)
    latent = torch.randn(batch, D, frames, 3, 3, generator=torch.Generator().manual_seed(seed))
    cond = torch.arange(batch) if cond is None else cond
    return build_batch(q, cfg, latent_BdTHW=latent, cond=cond, training=training,
                       generator=torch.Generator().manual_seed(seed), **kw)


def model_of(cfg, groups, seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(cfg, ParallelConfig(), groups, **kw)


def test_loss_backward_and_metrics(groups):
    cfg = make_cfg()
    model = model_of(cfg, groups)
    batch = make_batch(cfg)
    logits = model(batch)
    assert logits.shape == (2, batch.layout.video_len, D)
    out = bit_loss(logits, batch.targets_BNd, batch.layout, cfg.loss)
    out.loss.backward()
    assert torch.isfinite(out.loss) and abs(out.loss.item() - 0.693) < 0.05   # ≈ ln 2 at init
    assert out.per_scale_loss_K.shape == (3,) and out.per_scale_acc_K.shape == (3,)
    for name, p in model.named_parameters():
        if "class_emb" not in name:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_logits_never_depend_on_later_frames_or_scales(groups):
    cfg = make_cfg(mask={"rfm_window": 0, "rfm_p_mask": 0.0})
    model = model_of(cfg, groups).eval()
    batch = make_batch(cfg, training=False)
    L, start = batch.layout.tokens_per_frame, batch.layout.tokens_per_frame + 1 + 4   # frame 1, scale 2
    other = dataclasses.replace(batch, inputs_BNd=batch.inputs_BNd.clone())
    other.inputs_BNd[:, start:start + 9] += 1.0
    with torch.no_grad():
        a, b = model(batch), model(other)
    assert torch.equal(a[:, :start], b[:, :start])              # everything before (1, 2) untouched
    assert not torch.allclose(a[:, start:start + 9], b[:, start:start + 9])   # bidirectional in a scale
    assert not torch.allclose(a[:, 2 * L:], b[:, 2 * L:])          # later frames see it


def test_dropped_condition_is_the_null_class(groups):
    cfg = make_cfg()
    model = model_of(cfg, groups).eval()
    batch = make_batch(cfg, training=False, cond=torch.tensor([4, 9]))
    null = dataclasses.replace(batch, cond_drop_B=torch.tensor([True, True]))
    relabel = dataclasses.replace(null, class_B=torch.tensor([0, 1]))
    with torch.no_grad():
        assert torch.equal(model(null), model(relabel))            # labels ignored when dropped
        assert not torch.allclose(model(null), model(batch))


def test_padded_caption_features_do_not_leak(groups):
    cfg = make_cfg(condition={"kind": "text_features", "text_len": 5, "feature_dim": 12})
    model = model_of(cfg, groups).eval()
    feats = torch.randn(2, 5, 12)
    batch = make_batch(cfg, training=False, cond=feats, text_len_B=torch.tensor([2, 5]))
    changed = dataclasses.replace(batch, text_feat_BPD=feats.clone())
    changed.text_feat_BPD[0, 2:] += 3.0                            # padding of sample 0 only
    with torch.no_grad():
        a, b = model(batch), model(changed)
    assert torch.equal(a[0], b[0])
    changed.text_feat_BPD[1, 4] += 3.0                             # a valid token of sample 1
    with torch.no_grad():
        assert not torch.allclose(model(changed)[1], a[1])


@pytest.mark.parametrize("kind", ["class", "text_tokens", "text_features", "none"])
def test_every_condition_kind_runs_and_counts_its_parameters(groups, kind):
    cfg = make_cfg(condition={"kind": kind, "vocab_size": 50, "text_len": 4, "feature_dim": 12},
                   num_query_groups=2)
    model = model_of(cfg, groups)
    assert sum(p.numel() for p in model.parameters()) == count_parameters(cfg)["total"]
    cond = {"class": torch.tensor([1, 2]), "text_tokens": torch.randint(0, 50, (2, 4)),
            "text_features": torch.randn(2, 4, 12), "none": None}[kind]
    batch = make_batch(cfg, cond=cond)  # kind none: the default labels are ignored
    bit_loss(model(batch), batch.targets_BNd, batch.layout, cfg.loss).loss.backward()


def test_named_sizes_are_near_the_paper():
    report = parameter_report()
    print("\n" + report)
    L, XL = (count_parameters(ModelConfig(size=s))["total"] for s in ("L", "XL"))
    assert 0.95 < L / 926e6 < 1.02          # 24 x 1536 x 12 with 4h SwiGLU: 0.906B
    assert 1.0 < XL / 2.0e9 < 1.1           # 32 x 2048 x 16: 2.148B (the paper rounds; see params.py)


def test_two_stages_compose_to_the_whole_model(groups):
    """pre_process/post_process: stage A (embeddings + 2 layers) then stage B (2 layers + head)."""
    cfg = make_cfg(num_layers=4)
    full = model_of(cfg, groups).eval()
    half = dataclasses.replace(cfg, num_layers=2)
    stage_a = model_of(half, groups, pre_process=True, post_process=False).eval()
    stage_b = model_of(half, groups, pre_process=False, post_process=True).eval()
    full_sd = full.state_dict()
    for stage, offset in ((stage_a, 0), (stage_b, 2)):
        sd = {}
        for name in stage.state_dict():
            src = name
            if name.startswith("decoder.layers."):
                i, rest = name[len("decoder.layers."):].split(".", 1)
                src = f"decoder.layers.{int(i) + offset}.{rest}"
            sd[name] = full_sd[src]
        stage.load_state_dict(sd)
    batch = make_batch(cfg, training=False)
    with torch.no_grad():
        hidden = stage_a(batch)
        assert hidden.shape == (batch.layout.seq_len, 2, cfg.hidden_size)
        stage_b.set_input_tensor(hidden)
        torch.testing.assert_close(stage_b(batch), full(batch))


def test_config_errors_name_the_knob():
    with pytest.raises(ValueError, match="num_attention_heads"):
        ModelConfig(size="custom", num_layers=2, hidden_size=60, num_attention_heads=8)
    with pytest.raises(ValueError, match="axis_split"):
        build_dataclass(ModelConfig, {"rope": {"axis_split": [1, 1, 1]}})
    with pytest.raises(ValueError, match="rfm_p_mask"):
        build_dataclass(ModelConfig, {"mask": {"rfm_p_mask": 1.5}})
    with pytest.raises(ValueError, match="size=custom needs"):
        ModelConfig(size="custom")
    with pytest.raises(ValueError, match="flex_kernel"):
        build_dataclass(ModelConfig, {"flex_kernel": "cute"})


def test_flash_kernel_without_flash_attn_is_refused_before_building(groups):
    """model.flex_kernel=flash on a CUDA device without flash-attn-4 is refused with the knob and the
    fix named; on CPU (dense SDPA path) the knob is inert and the model builds."""
    import importlib.util
    from videoar_megatron.model.attention import check_flex_kernel
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ValueError, match=r"model\.flex_kernel=flash needs FlashAttention-4.*\[flash\]"):
        check_flex_kernel("flash", torch.device("cuda"))
    check_flex_kernel("flash", torch.device("cpu"))
    check_flex_kernel("triton", torch.device("cuda"))
    model_of(make_cfg(flex_kernel="flash"), groups)


def test_flash_kernel_with_the_frame_table_is_refused_before_building(groups):
    """model.flex_kernel=flash with a Random Frame Mask window or drop is refused before anything touches
    the GPU (it crashed the CUDA context in the first step, docs/training.md#attention-kernels)."""
    for mask in ({"rfm_window": 2, "rfm_p_mask": 0.0}, {"rfm_window": 0, "rfm_p_mask": 0.1}):
        with pytest.raises(ValueError, match=r"model\.flex_kernel=flash with model\.mask\.rfm_window"):
            build_model(make_cfg(flex_kernel="flash", mask=mask), ParallelConfig(), groups, device="cuda")


@pytest.mark.parametrize("window", [0, 1])
def test_kv_cached_steps_equal_the_teacher_forced_forward(groups, window):
    """Sampling's path: prefix, then one forward per (frame, scale) writing into the KV cache."""
    from videoar_megatron.model.attention import KVCache
    cfg = make_cfg(mask={"rfm_window": window, "rfm_p_mask": 0.0},
                   condition={"kind": "class", "tokens_per_class": 2}, num_query_groups=2)
    model = model_of(cfg, groups).eval()
    batch = make_batch(cfg, training=False, frames=3)
    layout = batch.layout
    with torch.no_grad():
        full = model(batch)
        cache = KVCache(layout.seq_len)
        assert model(batch, kv_cache=cache, positions=slice(0, layout.prefix_len)).shape[1] == 0
        steps = [model(batch, kv_cache=cache, positions=layout.step_slice(t, k))
                 for t in range(layout.frames) for k in range(layout.num_scales)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


def test_unconditional_branch_for_cfg(groups):
    cfg = make_cfg(condition={"kind": "text_tokens", "vocab_size": 50, "text_len": 4})
    model = model_of(cfg, groups).eval()
    a = make_batch(cfg, training=False, cond=torch.randint(0, 50, (2, 4)), text_len_B=torch.tensor([1, 3]))
    b = make_batch(cfg, training=False, cond=torch.randint(0, 50, (2, 4)), text_len_B=torch.tensor([4, 2]))
    with torch.no_grad():
        ua, ub = model(a.unconditional()), model(b.unconditional())
        assert torch.equal(ua, ub)                         # captions (and their lengths) ignored
        assert not torch.allclose(ua, model(a))


def test_model_config_yaml_round_trip(tmp_path):
    from videoar_common.config import load_config, save_resolved_config
    recipe = tmp_path / "model.yaml"
    recipe.write_text("size: L\nlatent_dim: 48\nrope: {axis_split: [22, 21, 21], grid: final}\n"
                      "condition: {kind: text_features, text_len: 32, feature_dim: 4096}\n"
                      "loss: {scale_weighting: infinitystar, scale_reweight: 4, scale_weights: [1, 1, 2]}\n")
    cfg = load_config(ModelConfig, recipe)
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_hidden_size) == (24, 1536, 12, 6144)
    assert cfg.rope.axis_split == (22, 21, 21) and cfg.prefix_len == 32
    assert load_config(ModelConfig, save_resolved_config(cfg, tmp_path / "run")) == cfg


def test_sharded_state_dict_covers_every_parameter(groups):
    """Megatron dist_checkpointing (reshardable checkpoints) sees every weight, ours included."""
    cfg = make_cfg(condition={"kind": "text_features", "text_len": 4, "feature_dim": 12})
    model = model_of(cfg, groups)
    sharded = model.sharded_state_dict()
    assert {name for name, _ in model.named_parameters()} <= set(sharded)


@pytest.mark.parametrize("capability,head_dim,refused", [
    ((8, 0), 128, "Hopper or newer"),
    ((9, 0), 128, None), ((9, 0), 97, None),          # VideoAR-L and XL: head_dim 128
    ((9, 0), 80, None), ((9, 0), 64, None),           # VideoAR-4B (2560 / 32): zero-padded to 128
    ((9, 0), 160, "head_dim <= 128"),                 # padding cannot shrink a head
    ((10, 0), 80, None),                              # Blackwell tiles differ; not limited here
])
def test_flash_kernel_head_dim_limits_name_the_knob(capability, head_dim, refused):
    """Where FlexAttention's FLASH backend cannot train (pre-Hopper; Hopper above head_dim 128), the
    reason names the head dim; below 97 Hopper trains padded heads (tests/test_model_kernels.py), and
    tests/test_model_gpu.py checks on a GPU that unpadded FA4 really fails there."""
    from videoar_megatron.model.attention import flash_unsupported
    reason = flash_unsupported(capability, head_dim)
    if refused is None:
        assert reason is None
    else:
        assert refused in reason and (str(head_dim) in reason or capability[0] < 9)
