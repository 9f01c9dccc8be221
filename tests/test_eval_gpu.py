"""On a GPU host: the I3D on CUDA gives the CPU features (TF32 off, as the reference ran in fp32)."""
from __future__ import annotations

import pytest
import torch

from test_eval_i3d import random_i3d
from videoar_megatron.evaluation.i3d import FeatureExtractor, FeatureExtractorConfig

pytestmark = pytest.mark.gpu


def test_cuda_features_equal_cpu_features_without_tf32():
    g = torch.Generator().manual_seed(0)
    clips = torch.randint(0, 256, (4, 3, 17, 128, 128), generator=g, dtype=torch.uint8)
    cfg = FeatureExtractorConfig(batch_size=2)
    cpu = FeatureExtractor(random_i3d(), backend="module", cfg=cfg, weights_sha256="")(clips)
    before = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    gpu = FeatureExtractor(random_i3d(), backend="module", cfg=cfg, weights_sha256="", device="cuda")(clips.cuda())
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before  # restored
    assert gpu.device.type == "cpu" and gpu.dtype == torch.float64
    torch.testing.assert_close(gpu, cpu, rtol=1e-4, atol=1e-4)
