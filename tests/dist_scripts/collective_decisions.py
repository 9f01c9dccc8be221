"""Under torchrun (2 ranks): a signal on one rank or a NaN on one rank is acted on by both."""
import json
import os
import signal
import sys

from videoar_common.distributed import init_distributed, shutdown_distributed
from videoar_common.numerics import NumericsConfig, NumericsError, NumericsGuard
from videoar_common.preemption import PreemptionConfig, PreemptionWatcher

ctx = init_distributed(device="cpu")
out = {}
with PreemptionWatcher(PreemptionConfig()) as watcher:
    out["stop_before"] = watcher.should_stop(ctx)
    if ctx.rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is signalled
    out["stop_after"] = watcher.should_stop(ctx)
    out["local_reason"] = watcher.local_reason()

guard = NumericsGuard(NumericsConfig(max_consecutive_skips=2))
out["good"] = guard.check(1.0, 1.0, ctx)
out["nan_on_rank1"] = guard.check(float("nan") if ctx.rank == 1 else 1.0, 1.0, ctx)
out["inf_grad_on_rank0"] = guard.check(1.0, float("inf") if ctx.rank == 0 else 1.0, ctx)
try:
    guard.check(float("nan"), 1.0, ctx)
    out["third_bad"] = "no error"
except NumericsError as e:
    out["third_bad"] = str(e)
with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as f:
    json.dump(out, f)
shutdown_distributed()
