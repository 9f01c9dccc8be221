"""``videoar train`` on the Megatron engine, emulated on CPU/gloo: the production CLI, trainer, engine
builder and optimizer builder, run inside ``videoar_megatron.training.cuda_compat.emulated_cuda`` (the
one documented place where Megatron's CUDA allocations are pointed at the host, restored on exit).

Select the engine with ``--set train.engine=megatron`` (``tests.train_helpers.run_train(...,
engine="megatron")`` does). An emulation for CPU CI, not a substitute for tests/test_train_gpu.py: it
checks the engine's wiring (DDP buffers, reduce-scatter, 1F1B p2p, grad norm and clipping, the guarded
step) and the distributed optimizer's checkpoint round trip (fully_reshardable, across TP/PP/DP), but
no CUDA kernel. It found two Megatron-core 0.16.1 bugs on the torch-AdamW path before any GPU run (see
``videoar_megatron.training.checkpoint.load_optimizer_state``).

Usage (python or torchrun): emulated_megatron_train.py <videoar train arguments>
"""
import sys

from videoar_megatron.cli.train import main
from videoar_megatron.training.cuda_compat import emulated_cuda

if __name__ == "__main__":
    with emulated_cuda():
        code = main(sys.argv[1:], prog="videoar train (emulated CUDA)")
    sys.exit(code)
