"""AR model weights in dist_checkpointing: committed by a marker, loadable at another TP size."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "dist_scripts"


def test_tp2_weights_load_at_tp1_and_back_with_equal_values(torchrun, tmp_path):
    torchrun(SCRIPTS / "weights_reshard.py", 2, "save", tmp_path, 2)
    assert (tmp_path / "ckpt" / "step_00000007" / "COMMITTED").is_file()
    torchrun(SCRIPTS / "weights_reshard.py", 1, "load", tmp_path, 1)
    saved = torch.load(tmp_path / "save_tp2.pt")
    loaded = torch.load(tmp_path / "load_tp1.pt")
    assert saved.keys() == loaded.keys() and len(saved) > 5
    for name in saved:
        torch.testing.assert_close(loaded[name], saved[name], rtol=0, atol=0, msg=name)


def test_resume_refusal_names_the_knob_the_user_changed_first():
    """Issue 23: `--set model.hidden_size=...` on resume was refused naming model.ffn_hidden_size (derived)."""
    from videoar_common.config import config_to_dict, load_config
    from videoar_megatron.training.checkpoint import ResumeError, check_resumable
    from videoar_megatron.training.config import TrainConfig
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "ar" / "tiny.yaml"
    saved = {"model_config": config_to_dict(load_config(TrainConfig, recipe).model)}
    cfg = load_config(TrainConfig, recipe, ["model.hidden_size=128"])
    with pytest.raises(ResumeError) as e:
        check_resumable(saved, cfg=cfg, manifests={}, optimizer=None)
    msg = str(e.value)
    assert "model.hidden_size: 64 in the checkpoint, 128 now (from --set model.hidden_size=128)" in msg, msg
    assert msg.index("model.hidden_size") < msg.index("model.ffn_hidden_size"), msg
