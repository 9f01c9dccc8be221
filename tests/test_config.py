"""Recipe loading: base chains, deep merge, strict keys and types, --set overrides, round trip."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import pytest

from videoar_common.config import (ConfigError, field_docs, iter_fields, load_config,
                                            save_resolved_config)


@dataclass(kw_only=True)
class OptimCfg:
    lr: float = 1e-4
    """Peak learning rate."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")


@dataclass(kw_only=True)
class ModelCfg:
    layers: int = 2
    """Transformer layers."""
    scales: list[list[int]] = field(default_factory=lambda: [[1, 1], [2, 2]])
    """Scale schedule."""
    norm: Literal["rmsnorm", "layernorm"] = "rmsnorm"
    """Normalisation."""
    text_encoder: str | None = None
    """Optional path."""


@dataclass(kw_only=True)
class RunCfg:
    name: str = "run"
    """Run name."""
    model: ModelCfg = field(default_factory=ModelCfg)
    """Model section."""
    optim: OptimCfg = field(default_factory=OptimCfg)
    """Optimizer section."""


def write(path, text):
    path.write_text(text)
    return path


def test_base_chain_deep_merge(tmp_path):
    write(tmp_path / "a.yaml", "name: a\nmodel: {layers: 4, norm: layernorm}\noptim: {lr: 0.1}\n")
    write(tmp_path / "b.yaml", "base: a.yaml\nmodel: {layers: 6}\n")
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "c.yaml", "base: ../b.yaml\nname: c\noptim: {betas: [0.8, 0.9]}\n")
    cfg = load_config(RunCfg, sub / "c.yaml")
    assert cfg.name == "c"
    assert cfg.model.layers == 6                       # from b, over a
    assert cfg.model.norm == "layernorm"               # kept from a by the deep merge
    assert cfg.optim.lr == 0.1 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.model.scales == [[1, 1], [2, 2]]        # dataclass default


def test_unknown_key_names_key_and_file(tmp_path):
    write(tmp_path / "base.yaml", "model: {layres: 3}\n")
    child = write(tmp_path / "child.yaml", "base: base.yaml\nname: x\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunCfg, child)
    msg = str(e.value)
    assert "model.layres" in msg and str(tmp_path / "base.yaml") in msg and "layers" in msg


@pytest.mark.parametrize("text,key", [
    ("model: {layers: 2.5}\n", "model.layers"),
    ("model: {layers: true}\n", "model.layers"),
    ("optim: {lr: fast}\n", "optim.lr"),
    ("model: {norm: batchnorm}\n", "model.norm"),
    ("optim: {betas: [0.9]}\n", "optim.betas"),
    ("model: 3\n", "model"),
    ("model: {scales: [[1, x]]}\n", "model.scales[0][1]"),
])
def test_wrong_type_names_key_and_file(tmp_path, text, key):
    path = write(tmp_path / "r.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(RunCfg, path)
    assert f"'{key}'" in str(e.value) and str(path) in str(e.value)


def test_post_init_check_names_section_and_file(tmp_path):
    path = write(tmp_path / "r.yaml", "optim: {lr: -1}\n")
    with pytest.raises(ConfigError, match=r"'optim': lr must be > 0.*r\.yaml"):
        load_config(RunCfg, path)


def test_set_overrides_with_same_checks(tmp_path):
    path = write(tmp_path / "r.yaml", "model: {layers: 4}\n")
    cfg = load_config(RunCfg, path, ["model.layers=8", "optim.lr=3e-4", "model.text_encoder=/x/t5",
                                     "model.scales=[[1,1],[3,3]]"])
    assert cfg.model.layers == 8 and cfg.optim.lr == 3e-4 and cfg.model.text_encoder == "/x/t5"
    assert cfg.model.scales == [[1, 1], [3, 3]]
    with pytest.raises(ConfigError, match=r"unknown key 'model.nope'.*--set model.nope=1"):
        load_config(RunCfg, path, ["model.nope=1"])
    with pytest.raises(ConfigError, match=r"'model.layers' must be an integer.*--set model.layers=many"):
        load_config(RunCfg, path, ["model.layers=many"])
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        load_config(RunCfg, path, ["model.layers"])


def test_resolved_config_round_trips(tmp_path):
    path = write(tmp_path / "r.yaml", "name: rt\nmodel: {layers: 5, scales: [[1, 2], [3, 4]]}\n")
    cfg = load_config(RunCfg, path, ["optim.betas=[0.5, 0.6]"])
    saved = save_resolved_config(cfg, tmp_path / "run")
    assert load_config(RunCfg, saved) == cfg


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(RunCfg, tmp_path / "a.yaml")


def test_missing_recipe_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="recipe file not found.*nothere.yaml"):
        load_config(RunCfg, tmp_path / "nothere.yaml")


def test_field_docs_are_read_from_source():
    docs = field_docs(RunCfg)
    assert docs["model"] == "Model section."
    keys = {k: doc for k, _, _, doc in iter_fields(RunCfg)}
    assert keys["optim.lr"] == "Peak learning rate." and keys["model.norm"] == "Normalisation."


@dataclass(kw_only=True)
class ParCfg:
    tensor: int = 1
    """Tensor-parallel size."""
    sequence: bool = False
    """Sequence parallelism (needs tensor > 1)."""
    recompute: bool = False
    """Activation recompute."""

    def __post_init__(self):
        if self.sequence and self.tensor == 1:
            raise ValueError("par.sequence needs par.tensor > 1")


@dataclass(kw_only=True)
class ParRunCfg:
    par: ParCfg = field(default_factory=ParCfg)
    """Parallel layout."""


def test_post_init_error_names_the_source_of_each_named_value(tmp_path):
    """The section first appears in base.yaml (sequence: false there); stage.yaml turns sequence on and
    --set turns tensor down: the error names those two sources, not where the section began."""
    write(tmp_path / "base.yaml", "par: {tensor: 1, sequence: false, recompute: false}\n")
    write(tmp_path / "mid.yaml", "base: base.yaml\npar: {tensor: 2, sequence: true}\n")
    stage = write(tmp_path / "stage.yaml", "base: mid.yaml\npar: {recompute: true}\n")
    with pytest.raises(ConfigError) as e:
        load_config(ParRunCfg, stage, ["par.tensor=1"])
    msg = str(e.value)
    assert f"par.sequence from {tmp_path / 'mid.yaml'}" in msg, msg
    assert "par.tensor from --set par.tensor=1" in msg, msg
    assert str(tmp_path / "base.yaml") not in msg and "recompute" not in msg, msg
    # a named value nobody set is the default
    with pytest.raises(ConfigError, match=r"par.sequence from --set par.sequence=true.*par.tensor: default"):
        load_config(ParRunCfg, None, ["par.sequence=true"])


def test_stage3_sequence_parallel_error_names_the_stage_recipes():
    """Issue 23: `recipes/ar/stage3.yaml --set parallel.tensor_parallel=1` blamed base.yaml."""
    from pathlib import Path
    from videoar_megatron.training.config import TrainConfig
    recipes = Path(__file__).resolve().parents[1] / "recipes" / "ar"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, recipes / "stage3.yaml", ["parallel.tensor_parallel=1"])
    msg = str(e.value)
    assert f"parallel.sequence_parallel from {recipes / 'stage3.yaml'}" in msg, msg
    assert "parallel.tensor_parallel from --set parallel.tensor_parallel=1" in msg, msg
    assert "base.yaml" not in msg, msg


def test_config_changes_put_the_knob_set_before_what_follows_from_it(tmp_path):
    """A resume check compares a saved config with this run's: the knob the user changed comes first,
    fields that the config derives from it (ffn_hidden_size = 4 x hidden_size when unset) after."""
    from videoar_common.config import config_changes, config_to_dict
    from videoar_megatron.model.config import ModelConfig
    saved = config_to_dict(load_config(ModelConfig, None, ["size=tiny"]))
    now = load_config(ModelConfig, None, ["size=tiny", "hidden_size=128", "norm_eps=1e-5"])
    changes = config_changes(saved, now, prefix="model.")
    assert [c.path for c in changes] == ["model.hidden_size", "model.norm_eps", "model.ffn_hidden_size"]
    assert [c.derived for c in changes] == [False, False, True]
    assert changes[0].before == 64 and changes[0].after == 128
    assert changes[0].source == "--set hidden_size=128" and changes[2].source is None


def test_warmup_longer_than_a_short_run_names_both_knobs_and_the_fix():
    """Issue 23: `--set train.steps=5` on the demo's AR recipe (warmup 50) is refused: the message names
    both values, where each was set, and the --set that makes the quick try run."""
    from pathlib import Path
    from videoar_megatron.training.config import TrainConfig
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "demo" / "ar.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, recipe, ["train.steps=5"])
    msg = str(e.value)
    assert "optim.warmup_steps=50" in msg and "train.steps=5" in msg, msg
    assert f"optim.warmup_steps from {recipe}" in msg and "train.steps from --set train.steps=5" in msg, msg
    assert "add --set optim.warmup_steps=0" in msg, msg
    assert load_config(TrainConfig, recipe, ["train.steps=5", "optim.warmup_steps=0"]).train.steps == 5
