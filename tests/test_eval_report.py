"""Reports: standard JSON (NaN spelled out), and a Markdown table with our number above the paper's."""
from __future__ import annotations

import json

import torch

from eval_helpers import ProjectionExtractor, make_generator, real_clips
from videoar_common.distributed import DistContext
from videoar_megatron.evaluation.protocols import FVDProtocolConfig, TensorClipSource, run_fvd_protocol
from videoar_megatron.evaluation.report import fvd_markdown, recon_markdown, write_report

SINGLE = DistContext(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                     backend="gloo")


def test_fvd_report_places_ours_next_to_the_paper(tmp_path):
    clips, labels = real_clips(40)
    cfg = FVDProtocolConfig(num_frames=9, resolution=16, num_samples=10, num_folds=2)
    result = run_fvd_protocol(cfg, generate=make_generator(0.2), source=TensorClipSource(clips, labels),
                              extractor=ProjectionExtractor(), ctx=SINGLE).to_dict()
    json_path, md_path = write_report(tmp_path, "fvd_report", result, fvd_markdown(result))
    report = json.loads(json_path.read_text())
    assert report["result"]["fvd_per_fold"] == result["fvd_per_fold"]
    assert report["result"]["protocol"]["num_samples"] == 10
    assert {p["method"]: p["value"] for p in report["published"]}["VideoAR-L (paper)"] == 90.3
    md = md_path.read_text()
    ours = f"{result['mean']:.1f} ± {result['std']:.1f}"
    lines = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert ours in lines[2] and "**ours**" in lines[2]              # first row under the header
    assert any("VideoAR-XL (paper)" in ln and "88.6" in ln for ln in lines)
    assert any("NBP-3B" in ln and "55.3" in ln for ln in lines)


def test_recon_report_is_standard_json_even_with_nan(tmp_path):
    result = {"rfvd": float("nan"), "psnr": 30.0, "ssim": 0.9, "num_clips": 1,
              "extractor": {"backend": "torchscript", "weights_sha256": "ab" * 32, "resize": "bilinear"}}
    json_path, md_path = write_report(tmp_path, "rfvd_report", result, recon_markdown(result))
    text = json_path.read_text()
    assert "NaN" not in text and json.loads(text)["result"]["rfvd"] == "nan"
    assert "| **n/a** | 30.00 | 0.9000 |" in md_path.read_text()
    assert "| VideoAR-L tokenizer (paper) | 5x8x8 tokens | 61.0 |" in md_path.read_text()
