"""AR model weights in dist_checkpointing: committed by a marker, loadable at another TP size."""
from __future__ import annotations

from pathlib import Path

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
