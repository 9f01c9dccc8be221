"""One process, one GPU: VideoAR through ``model.flex_kernel=flash`` on a batch whose mask reads the Random
Frame Mask's frame table (window 2, drop 0.3), forward and backward. It runs in a process of its own
because what it can provoke, a crash in the first forward, takes the CUDA context with it. Prints
"forward and backward ran" and exits 0 when the model runs; tests/test_model_gpu.py starts it.

The crash (CUDA "operation not supported on global/shared address space", sessions 8-10) is suspected
to come from FA4 reading the index tables up to a tile past the sequence end (``layout.INDEX_SLACK``;
not yet confirmed on a GPU): what lay after a table became a frame-table index. ``--poison-slack`` writes a huge frame index into the tables' slack,
which is what reading foreign memory there amounts to: with it the model must crash, without it run.
The other options vary one thing at a time (one process per case), e.g. on a GPU host with the 'flash'
extra:

    for a in "" "--poison-slack" "--head-dim 128" "--batch 1" "--window 0 --p-mask 0"; do
        python tests/dist_scripts/flash_frame_table.py $a; echo "$a -> exit $?"; done

Defaults: VideoAR-4B's head dim 80 (padded to 128 on Hopper), 4 heads, 2 layers, 2 samples of 5 latent
frames (651 tokens: the last query tile runs past the end), window 2, drop 0.3.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tests.process_groups import single_process_groups  # noqa: E402
from tokenizer.quantizer import MultiScaleBSQ  # noqa: E402
from videoar_common.config import build_dataclass  # noqa: E402
from videoar_megatron.model.config import MaskConfig, ModelConfig, ParallelConfig  # noqa: E402
from videoar_megatron.model.layout import INDEX_SLACK  # noqa: E402
from videoar_megatron.model.loss import bit_loss  # noqa: E402
from videoar_megatron.model.mask import is_full_context  # noqa: E402
from videoar_megatron.model.model import build_model  # noqa: E402
from videoar_megatron.model.sequence import build_batch  # noqa: E402

UCF_SCALES = ((1, 1), (2, 2), (3, 3), (4, 4), (6, 6), (8, 8))


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--head-dim", type=int, default=80, help="head width (4 heads; 80: VideoAR-4B's)")
    p.add_argument("--batch", type=int, default=2, help="samples")
    p.add_argument("--window", type=int, default=2, help="model.mask.rfm_window of the batch")
    p.add_argument("--p-mask", type=float, default=0.3, help="model.mask.rfm_p_mask of the batch")
    p.add_argument("--poison-slack", action="store_true",
                   help="write a frame index far past the frame table into the layout tables' slack")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse(argv)
    cfg = build_dataclass(ModelConfig, {"size": "custom", "num_layers": 2, "hidden_size": 4 * args.head_dim,
                                        "num_attention_heads": 4, "latent_dim": 16, "flex_kernel": "flash",
                                        "attention_backend": "flex"})
    drawn = dataclasses.replace(cfg, mask=MaskConfig(rfm_window=args.window, rfm_p_mask=args.p_mask))
    with single_process_groups("cuda") as groups:
        model = build_model(cfg, ParallelConfig(), groups, device="cuda", params_dtype=torch.bfloat16)
        quantizer = MultiScaleBSQ(dim=16, scales=UCF_SCALES)
        batch = build_batch(quantizer, drawn, latent_BdTHW=torch.randn(args.batch, 16, 5, 8, 8, device="cuda"),
                            cond=torch.arange(3, 3 + args.batch), training=True,
                            generator=torch.Generator("cuda").manual_seed(0))
        print(f"frame table read: {not is_full_context(batch.frame_visible_BTT)}", flush=True)
        if args.poison_slack:  # the model reads these very tensors (tables are cached per layout)
            index_S = batch.layout.tables(batch.frame_visible_BTT.device).frame_index_S
            torch.as_strided(index_S, (index_S.shape[0] + INDEX_SLACK,), (1,))[index_S.shape[0]:] = 1 << 28
            print("slack poisoned", flush=True)
        kernel = model.flex_kernel_for(batch.layout.seq_len)
        print(f"flex kernel: {kernel.name} ({kernel.reason})", flush=True)
        bit_loss(model(batch).float(), batch.targets_BNd, batch.layout, cfg.loss).loss.backward()
        torch.cuda.synchronize()
    print("forward and backward ran")


if __name__ == "__main__":
    main()
