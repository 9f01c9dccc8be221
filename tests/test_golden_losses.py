"""Golden losses: the tiny AR recipe's first steps on fixed synthetic shards equal stored values.

Resume, reshard and parity tests compare two runs of the same code, so a change that alters what the
trainer computes (a different bit-flip draw, mask, RoPE or loss weighting) passes them all. This test
pins the numbers themselves: ``tests/golden/ar_tiny_losses.json`` holds the per-step losses of
``recipes/ar/tiny.yaml`` (fp32, CPU, error correction, Random Frame Mask and condition dropout as the
recipe sets them) on shards from ``write_synthetic_shards`` (seeded torch RNG, no video decoding, so
they are the same on every machine). The tolerance allows for CPU kernels that sum in another order
(other instruction sets, thread counts); a semantic change moves the losses by orders of magnitude more.

An intended change of the numerics regenerates the file, and the commit says why:

    python -m tests.test_golden_losses --write
"""
from __future__ import annotations

import json
import math
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden" / "ar_tiny_losses.json"
SHARDS = {"num": 32, "frames": 3, "schedule": [[1, 1], [2, 2]], "latent_dim": 8, "classes": 4, "seed": 0}
SETS = ("train.steps=12", "optim.warmup_steps=2", "checkpoint.save_every=0")
REL_TOL = 1e-4


def tiny_losses(root: Path) -> dict[int, float]:
    from benchmarks.train_common import write_synthetic_shards
    from tests.train_helpers import losses, run_train
    shards = write_synthetic_shards(root / "shards", **SHARDS)
    run_train(1, root / "run", shards, *SETS)
    return losses(root / "run")


def test_tiny_recipe_reproduces_the_golden_losses(tmp_path):
    golden = json.loads(GOLDEN.read_text())
    assert golden["shards"] == SHARDS and golden["sets"] == list(SETS), \
        "the test's setup changed: regenerate the golden file (see the module docstring)"
    want = {int(k): v for k, v in golden["losses"].items()}
    got = tiny_losses(tmp_path)
    assert sorted(got) == sorted(want)
    off = {s: (got[s], want[s]) for s in want if not math.isclose(got[s], want[s], rel_tol=REL_TOL)}
    assert not off, f"losses moved from the golden values (step: (now, golden)): {off}"
    assert want[max(want)] < want[1]  # the stored run learns something: a constant file would not


def write_golden() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        got = tiny_losses(Path(tmp))
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps({"recipe": "recipes/ar/tiny.yaml", "sets": list(SETS), "shards": SHARDS,
                                  "losses": {str(k): got[k] for k in sorted(got)}}, indent=1) + "\n")
    print(f"wrote {GOLDEN}: {len(got)} steps, loss {got[min(got)]:.6f} -> {got[max(got)]:.6f}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.test_golden_losses --write")
    write_golden()
