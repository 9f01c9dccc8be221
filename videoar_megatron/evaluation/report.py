"""Evaluation reports: a JSON file with everything needed to reproduce the number, and a short
Markdown table placing it next to the paper's and other published numbers.

Published numbers come from the VideoAR paper (Tables 2 and 3) and DESIGN.md §2 / the method notes.
Their protocols are not all the same (the paper does not state its own), so each row carries the
protocol note the source gives; a comparison is only meaningful when the protocols match.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from videoar_common.atomic import atomic_write_json, atomic_write_text


@dataclass(frozen=True)
class Published:
    method: str
    params: str
    value: float
    note: str


# UCF-101 class-conditional gFVD (lower is better).
PUBLISHED_GFVD = (
    Published("VideoAR-L (paper)", "926M", 90.3, "30 steps; protocol not stated (17 fr, 128² inferred)"),
    Published("VideoAR-XL (paper)", "2.0B", 88.6, "30 steps; protocol not stated"),
    Published("PAR-4x", "792M", 99.5, "323 steps (VideoAR Tab. 3 / NAR Tab. 2)"),
    Published("MAGVIT-v2-AR", "840M", 109.0, "1280 steps (VideoAR Tab. 3)"),
    Published("OmniTokenizer", "650M", 191.0, "VideoAR Tab. 3"),
    Published("NAR-LP", "694M", 71.1, "34 steps (NAR Tab. 2)"),
    Published("LARP-L-Long-AR", "632M", 57.0, "16 fr, 10k single run, cfg 1.25 (LARP README)"),
    Published("NBP-3B", "3B", 55.3, "17 fr, 10k x 4 folds (NBP)"),
)

# UCF-101 tokenizer reconstruction rFVD (lower is better), VideoAR Table 2.
PUBLISHED_RFVD = (
    Published("VideoAR-L tokenizer (paper)", "5x8x8 tokens", 61.0, "ratio 16"),
    Published("TATS", "4x16x16 tokens", 162.0, "ratio 8"),
    Published("MAGVIT", "5x16x16 tokens", 58.0, "ratio 8"),
    Published("OmniTokenizer", "5x16x16 tokens", 42.0, "ratio 8"),
)


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _extractor_note(identity: dict) -> str:
    sha = identity.get("weights_sha256", "")[:12]
    return f"I3D {identity.get('backend', identity.get('network', '?'))} {sha}, resize {identity.get('resize', '?')}"


def fvd_markdown(result: dict) -> str:
    """Markdown table: our gFVD (mean ± std over folds) above the published rows."""
    proto = result["protocol"]
    ours = _fmt(result["mean"]) + (f" ± {_fmt(result['std'])}" if result["num_folds"] > 1 else "")
    setting = (f"{proto['name']}: {proto['num_frames']} fr, {proto['resolution']}², "
               f"{result['num_samples']} x {result['num_folds']} fold(s), labels {proto['label_source']}, "
               f"{_extractor_note(result['extractor'])}")
    rows = [f"| **ours** | | **{ours}** | {setting} |"]
    rows += [f"| {p.method} | {p.params} | {_fmt(p.value)} | {p.note} |" for p in PUBLISHED_GFVD]
    per_fold = ", ".join(_fmt(v, 2) for v in result["fvd_per_fold"])
    return ("## UCF-101 class-conditional gFVD (lower is better)\n\n"
            "| method | params | gFVD | protocol |\n|---|---|---|---|\n" + "\n".join(rows) +
            f"\n\nPer fold: {per_fold}.\n")


def recon_markdown(result: dict) -> str:
    """Markdown table: our rFVD / PSNR / SSIM above the published rFVD rows."""
    setting = f"{result['num_clips']} held-out clips, {_extractor_note(result['extractor'])}"
    rows = [f"| **ours** | | **{_fmt(result['rfvd'])}** | {_fmt(result['psnr'], 2)} | "
            f"{_fmt(result['ssim'], 4)} | {setting} |"]
    rows += [f"| {p.method} | {p.params} | {_fmt(p.value)} | | | {p.note} |" for p in PUBLISHED_RFVD]
    return ("## Tokenizer reconstruction on UCF-101 (rFVD lower, PSNR/SSIM higher is better)\n\n"
            "| method | tokens | rFVD | PSNR (dB) | SSIM | setting |\n|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nPSNR per clip in [0, 1]; SSIM 11x11 Gaussian (σ 1.5) per RGB channel.\n")


def _json_safe(obj):
    """NaN/inf are not JSON: write them as strings so the report stays standard JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_report(out_dir: str | Path, name: str, result: dict, markdown: str,
                 extra: dict | None = None) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` into ``out_dir`` (atomically); returns both paths."""
    out = Path(out_dir)
    published = PUBLISHED_GFVD if name.startswith("fvd") else PUBLISHED_RFVD
    payload = {"result": _json_safe(result), "published": [asdict(p) for p in published], **(extra or {})}
    json.dumps(payload, allow_nan=False)  # fail here, not in a reader, if anything is not plain JSON
    return atomic_write_json(out / f"{name}.json", payload), atomic_write_text(out / f"{name}.md", markdown)
