"""Evaluation: FVD with the Kinetics-400 I3D, gFVD protocols, tokenizer reconstruction metrics, reports.

Modules: ``i3d`` (network, weight loading, preprocessing, :class:`FeatureExtractor`), ``fvd``
(float64 statistics, Fréchet distance, real-statistics cache), ``protocols`` (MAGVIT-v2/NBP and
single-run gFVD over ranks), ``recon`` (rFVD, PSNR, SSIM), ``clips`` (real clips from a manifest),
``report`` (JSON + Markdown next to published numbers), ``config`` (the eval recipe).
"""
