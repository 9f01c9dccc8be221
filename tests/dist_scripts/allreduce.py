"""Run under torchrun: every rank reports its context and the result of an all-reduce."""
import json
import sys

import torch
import torch.distributed as dist

from videoar_common.distributed import init_distributed, shutdown_distributed

ctx = init_distributed(device="cpu")
t = torch.tensor([float(ctx.rank + 1)])
dist.all_reduce(t)
any_flag = ctx.any(ctx.rank == ctx.world_size - 1)
out = {"rank": ctx.rank, "world": ctx.world_size, "local_rank": ctx.local_rank,
       "backend": ctx.backend, "sum": t.item(), "any": any_flag}
with open(f"{sys.argv[1]}/rank{ctx.rank}.json", "w") as f:
    json.dump(out, f)
shutdown_distributed()
