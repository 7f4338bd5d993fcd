"""FID's feature network, read from a local file only (TorchScript, or a MONAI / MedicalNet ResNet state dict), and
FID with MONAI's ``FIDMetric`` on its features. Nothing is ever downloaded."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import EvaluateError
from .metrics import _check_volumes

def _resnet_from_state_dict(state: Mapping[str, torch.Tensor], path: Path) -> torch.nn.Module:
    """A MONAI ``ResNet`` feature extractor whose architecture is read from a (MedicalNet-style) state dict."""
    from monai.networks.nets.resnet import ResNet, ResNetBlock, ResNetBottleneck

    state = {k.replace("module.", "", 1) if k.startswith("module.") else k: v for k, v in state.items()}
    if "conv1.weight" not in state:
        raise EvaluateError(
            f"FID weights {str(path)!r}: a state dict without 'conv1.weight' is not a ResNet; expected a TorchScript "
            "feature extractor or a MONAI/MedicalNet ResNet state dict"
        )
    conv1 = state["conv1.weight"]
    spatial_dims = conv1.ndim - 2
    layers = []
    for i in range(1, 5):
        blocks = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{i}.")}
        layers.append(len(blocks))
    bottleneck = "layer1.0.conv3.weight" in state
    block = ResNetBottleneck if bottleneck else ResNetBlock
    inplanes = [int(state[f"layer{i}.0.conv1.weight"].shape[0]) for i in range(1, 5)]
    shortcut = "B" if any(k.startswith("layer2.0.downsample.") for k in state) else "A"
    net = ResNet(
        block=block,
        layers=layers,
        block_inplanes=inplanes,
        spatial_dims=spatial_dims,
        n_input_channels=int(conv1.shape[1]),
        conv1_t_size=tuple(int(s) for s in conv1.shape[2:]),
        conv1_t_stride=2,
        shortcut_type=shortcut,
        feed_forward=False,
        bias_downsample="layer2.0.downsample.0.bias" in state,
    )
    missing, unexpected = net.load_state_dict({k: v for k, v in state.items() if not k.startswith("fc.")}, strict=False)
    if missing:
        raise EvaluateError(f"FID weights {str(path)!r}: {len(missing)} ResNet weight(s) missing, e.g. {missing[:3]}")
    net.fid_normalize = True  # MedicalNet convention: z-score each volume
    return net


def load_feature_extractor(path: str | os.PathLike) -> torch.nn.Module:
    """Load the feature extractor for FID from a local file; nothing is ever downloaded.

    Two kinds of file are accepted:

    - a TorchScript module (``torch.jit.save``) that maps ``(N, C, *spatial)`` volumes, as they are, to features
      ``(N, F)`` or ``(N, F, *spatial)`` (then averaged over space);
    - a ``torch.save``-d state dict of a MONAI / MedicalNet ``ResNet`` (keys ``conv1.weight``, ``layer1.0...``;
      a ``"state_dict"`` entry and ``module.`` prefixes are accepted), e.g. MedicalNet's ``resnet_10_23dataset.pth``
      for 3D. The depth, block type, shortcut type and input channels are read from the keys; volumes are z-scored
      per volume before the network, and the last feature map is averaged over space.

    Args:
        path: the weights file.

    Raises:
        EvaluateError: the file is missing or is neither kind.
    """
    import importlib.util

    file = Path(path).expanduser()
    if importlib.util.find_spec("scipy") is None:
        raise EvaluateError("FID needs scipy (MONAI's FIDMetric uses scipy.linalg.sqrtm): pip install scipy")
    if not file.is_file():
        raise EvaluateError(
            f"FID feature-extractor weights {str(file)!r} not found; FID needs a local file (a TorchScript feature "
            "extractor or a MedicalNet/MONAI ResNet state dict, see docs/evaluate.md); nothing is downloaded"
        )
    try:
        net = torch.jit.load(str(file), map_location="cpu")
        net.fid_normalize = False
        return net.eval()
    except Exception:  # not TorchScript: try a state dict
        pass
    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EvaluateError(
            f"FID weights {str(file)!r} are neither a TorchScript module nor a torch state dict: {exc}"
        ) from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise EvaluateError(f"FID weights {str(file)!r} hold a {type(state).__name__}, not a state dict")
    return _resnet_from_state_dict(state, file).eval()


def _features(net: torch.nn.Module, x: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    feats = []
    normalize = bool(getattr(net, "fid_normalize", False))
    with torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].float()
            if normalize:
                dims = tuple(range(1, xb.ndim))
                xb = (xb - xb.mean(dim=dims, keepdim=True)) / xb.std(dim=dims, keepdim=True).clamp_min(1e-6)
            f = net(xb)
            if isinstance(f, (tuple, list)):
                f = f[-1]
            feats.append(f.reshape(f.shape[0], f.shape[1], -1).mean(dim=2) if f.ndim > 2 else f)
    return torch.cat(feats)


def fid(real: torch.Tensor, samples: torch.Tensor, extractor: torch.nn.Module) -> float:
    """MONAI ``FIDMetric`` on the features of ``extractor`` (see :func:`load_feature_extractor`).

    Args:
        real: reference volumes, at least 2.
        samples: generated volumes, at least 2.
        extractor: the feature network.
    """
    from monai.metrics import FIDMetric

    _check_volumes(real, "real", 2)
    _check_volumes(samples, "samples", 2)
    try:
        fr, fs = _features(extractor, real), _features(extractor, samples)
    except RuntimeError as exc:
        raise EvaluateError(f"the FID feature extractor cannot process volumes of shape {list(real.shape[1:])}: {exc}") from exc
    return float(FIDMetric()(fs, fr))
