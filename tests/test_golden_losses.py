"""Golden losses: the tiny AR recipe's loss curve on fixed synthetic shards equals stored values.

Resume, reshard and parity tests compare two runs of the same code, so a change that alters what the
trainer computes (a different bit-flip draw, mask, RoPE or loss weighting) passes them all. This test
pins the numbers themselves: ``tests/golden/ar_tiny_losses.json`` holds the per-step losses of
``recipes/ar/tiny.yaml`` (fp32, CPU, error correction, Random Frame Mask, condition dropout and two
micro-batches per step as the recipe sets them) on shards from ``write_synthetic_shards`` (seeded torch
RNG, no video decoding, so they are the same on every machine).

The run is long enough for learning to show: 8 samples, each its own class (so the label names the
sample and every bit can be memorized), 40 steps at lr 5e-3 take the loss from chance (ln 2 = 0.693)
to about 0.61. A run that does not learn, or learns something else, is off the pinned curve by far more
than the tolerance. The tolerance (1e-5 relative) allows for CPU kernels that sum in another order
(other instruction sets, thread counts): 2 threads instead of 1 changed nothing, and splitting each step
into 1 micro-batch instead of 2, which reorders the gradient sums, moved no loss of the 40 by more than
2e-7. Small semantic changes move them further: RoPE frequencies 1% off move them by 6e-5.

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
SHARDS = {"num": 8, "frames": 3, "schedule": [[1, 1], [2, 2]], "latent_dim": 8, "classes": 8, "seed": 0}
SETS = ("train.steps=40", "optim.warmup_steps=2", "optim.lr=5e-3", "checkpoint.save_every=0")
REL_TOL = 1e-5
CHANCE = math.log(2)  # bitwise cross-entropy of a model that knows nothing
LEARNED = 0.05        # the last 5 steps' mean loss must be this far below chance (pinned run: ~0.08)


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
    assert abs(got[1] - CHANCE) < 0.01, f"the first step is not at chance: {got[1]}"
    final = sum(got[s] for s in sorted(got)[-5:]) / 5
    assert final < CHANCE - LEARNED, f"this run does not learn: mean loss of the last 5 steps {final:.4f}"
    off = {s: (got[s], want[s]) for s in want if not math.isclose(got[s], want[s], rel_tol=REL_TOL)}
    assert not off, f"losses moved from the golden values (step: (now, golden)): {off}"


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
