"""Run the trainer's *GPU* engine on CPU/gloo: Megatron DDP, the distributed optimizer, the pipeline
schedules and finalize_model_grads, with Megatron's CUDA-only allocations redirected to the host.

An emulation for CPU CI, not a substitute for tests/test_train_gpu.py: it checks the engine's wiring
(DDP buffers, reduce-scatter, 1F1B p2p, grad norm and clipping, the guarded step) and the distributed
optimizer's checkpoint round trip (fully_reshardable, across TP/PP), but no CUDA kernel. It found two
Megatron-core 0.16.1 bugs on the torch-AdamW path before any GPU run (see
``videoar_megatron.training.checkpoint.load_optimizer_state``).

What is redirected (and why it is safe here): ``torch.cuda.current_device`` → "cpu" (buffer
allocations), ``torch.zeros/empty/tensor(device="cuda")`` → CPU (schedule counters, loss scale),
``Tensor.cuda()`` → identity, ``Tensor.type()`` → the CUDA type name (the optimizer's dtype check),
``torch.cuda.synchronize`` → no-op; the trainer's device checks are skipped and the Megatron engine is
forced. Everything else is Megatron's and the trainer's own code.

Usage (under torchrun): emulated_megatron_train.py RUN_DIR KEY=VALUE...   (tiny recipe overrides)
"""
import sys

import torch


def install() -> None:
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda *a, **k: None
    for name in ("zeros", "empty", "tensor"):
        original = getattr(torch, name)

        def redirected(*args, _original=original, **kwargs):
            if kwargs.get("device") == "cuda":
                kwargs["device"] = "cpu"
            return _original(*args, **kwargs)
        setattr(torch, name, redirected)
    tensor_type = torch.Tensor.type

    def cuda_type(self, *args, **kwargs):
        if args or kwargs:
            return tensor_type(self, *args, **kwargs)
        name = tensor_type(self)
        return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
    torch.Tensor.type = cuda_type
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


def main() -> None:
    install()
    from tests.train_helpers import TINY_RECIPE
    from videoar_common.config import load_config
    from videoar_megatron.training import trainer as trainer_lib
    from videoar_megatron.training.config import TrainConfig
    from videoar_megatron.training.engine import MegatronEngine
    from videoar_megatron.training.optim import build_megatron_optimizer

    run_dir, overrides = sys.argv[1], sys.argv[2:]
    cfg = load_config(TrainConfig, TINY_RECIPE, ["logging.progress_bar=false", *overrides])

    def megatron_engine(self):
        engine = MegatronEngine(self.model, cfg.model.loss, distributed_optimizer=cfg.optim.distributed_optimizer)
        optimizer = build_megatron_optimizer(engine.model_chunks, cfg.optim, bf16=False)
        engine.attach_optimizer(optimizer)
        return engine, optimizer

    trainer_lib.Trainer._check_device = lambda self: None
    trainer_lib.Trainer._build_engine = megatron_engine
    trainer = trainer_lib.build_trainer(cfg, run_dir)
    try:
        print(trainer.restore(), file=sys.stderr)
        code = trainer.train()
    finally:
        trainer.close()
    sys.exit(code)


if __name__ == "__main__":
    main()
