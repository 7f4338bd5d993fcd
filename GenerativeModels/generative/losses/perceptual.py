# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3 ``PerceptualLoss`` on top of MONAI core's, for machines without internet access.

Importing this module needs neither ``lpips`` nor ``torchvision``. Constructing the loss checks, before anything
is loaded, that the packages and the pretrained weights it needs are available locally, and otherwise raises a
``RuntimeError`` that says what to install or which weights file to pass.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from monai.losses import PerceptualLoss as _CorePerceptualLoss

try:
    from monai.losses.perceptual import PerceptualNetworkType
except ImportError:  # MONAI < 1.6 spelled the enum's name without the second "p"; same members
    from monai.losses.perceptual import PercetualNetworkType as PerceptualNetworkType

__all__ = ["PerceptualLoss", "PerceptualNetworkType"]

# file names under which torchvision caches the ImageNet weights (``<torch hub dir>/checkpoints/<name>``)
BACKBONE_FILES = {
    "alex": "alexnet-owt-7be5be79.pth",
    "vgg": "vgg16-397923af.pth",
    "squeeze": "squeezenet1_1-b8a52dc0.pth",
    "resnet50": "resnet50-11ad3fa6.pth",
}
HUB_REPO = "Project-MONAI/perceptual-models"
HUB_REPO_DIR = "Project-MONAI_perceptual-models_main"


def _weights_source(spatial_dims: int, network_type: str, is_fake_3d: bool) -> str | None:
    """Where MONAI core would get the network from; ``None`` when core rejects the configuration itself."""
    if spatial_dims not in (2, 3) or network_type not in list(PerceptualNetworkType):
        return None
    if spatial_dims == 3 and not is_fake_3d:
        return "hub" if network_type.startswith("medicalnet_") else None
    if network_type.startswith("medicalnet_"):
        return None
    if network_type.startswith("radimagenet_"):
        return "hub"
    return "torchvision" if network_type == "resnet50" else "lpips"


def _missing_packages(source: str) -> list[str]:
    needed = {"lpips": ["lpips", "torchvision"], "torchvision": ["torchvision"]}.get(source, [])
    return [name for name in needed if importlib.util.find_spec(name) is None]


@contextmanager
def _hub_dir_holding(file_name: str, weights_path: str, state_dict_key: str | None) -> Iterator[None]:
    """Point torch hub, for the duration, at a temporary folder whose ``checkpoints/file_name`` is the given file."""
    previous = torch.hub.get_dir()
    with tempfile.TemporaryDirectory() as folder:
        target = os.path.join(folder, "checkpoints", file_name)
        os.makedirs(os.path.dirname(target))
        if state_dict_key is not None:
            weights = torch.load(weights_path, map_location="cpu", weights_only=True)
            torch.save(weights[state_dict_key], target)
        else:
            try:
                os.symlink(os.path.abspath(weights_path), target)
            except OSError:
                shutil.copyfile(weights_path, target)
        torch.hub.set_dir(folder)
        try:
            yield
        finally:
            torch.hub.set_dir(previous)


class PerceptualLoss(_CorePerceptualLoss):
    """
    ``monai.losses.PerceptualLoss`` that never tries to download weights.

    MONAI core fetches the networks at construction: the ImageNet backbones of ``"alex"``, ``"vgg"``,
    ``"squeeze"`` and ``"resnet50"`` through torchvision, and ``"radimagenet_resnet50"`` and the
    ``"medicalnet_*"`` networks through ``torch.hub`` from GitHub. This class first checks that what is needed is on
    disk and raises a ``RuntimeError`` naming the package to install or the weights file to provide otherwise.

    Differences from MONAI core:
        - ``pretrained_path`` also works for ``"alex"``, ``"vgg"`` and ``"squeeze"``: it is the torchvision
          state dict of the backbone (e.g. ``alexnet-owt-7be5be79.pth``); the LPIPS layers on top come with the
          ``lpips`` package. For these networks ``cache_dir`` is then not used.
        - Without ``pretrained_path`` the weights must already be in ``<cache_dir or torch hub dir>/checkpoints``
          (torch hub networks: the repository in ``<cache_dir or torch hub dir>/Project-MONAI_perceptual-models_main``,
          whose own weights must be cached as well).
        - ``channel_wise`` is a core addition (default ``False``, 0.2.3's behaviour); all other arguments and
          defaults are the same as 0.2.3's and core's.

    Args:
        spatial_dims: number of spatial dimensions, 2 or 3.
        network_type: ``"alex"``, ``"vgg"``, ``"squeeze"``, ``"resnet50"``, ``"radimagenet_resnet50"``,
            ``"medicalnet_resnet10_23datasets"`` or ``"medicalnet_resnet50_23datasets"``.
        is_fake_3d: for 3D inputs, average a 2D network over slices along each axis (required unless MedicalNet).
        fake_3d_ratio: fraction of the slices of each axis used when ``is_fake_3d``.
        cache_dir: torch hub folder holding cached weights; MONAI core makes it torch hub's folder for the process.
        pretrained: load pretrained weights (LPIPS layers for alex/vgg/squeeze, the whole network for resnet50).
        pretrained_path: local weights file: torchvision state dict of the backbone for alex/vgg/squeeze/resnet50.
        pretrained_state_dict_key: key of the state dict inside the ``pretrained_path`` file, if it is nested.
        channel_wise: return one loss per channel (MedicalNet networks only).

    Raises:
        RuntimeError: a needed package is not installed, or the weights are neither given nor cached.
        ValueError: ``pretrained_path`` is not a file, or is given for a torch hub network.
    """

    def __init__(
        self,
        spatial_dims: int,
        network_type: str = PerceptualNetworkType.alex,
        is_fake_3d: bool = True,
        fake_3d_ratio: float = 0.5,
        cache_dir: str | None = None,
        pretrained: bool = True,
        pretrained_path: str | None = None,
        pretrained_state_dict_key: str | None = None,
        channel_wise: bool = False,
    ) -> None:
        net = str(network_type).lower()
        kwargs = {
            "spatial_dims": spatial_dims,
            "network_type": net,
            "is_fake_3d": is_fake_3d,
            "fake_3d_ratio": fake_3d_ratio,
            "cache_dir": cache_dir,
            "pretrained": pretrained,
            "pretrained_path": pretrained_path,
            "pretrained_state_dict_key": pretrained_state_dict_key,
            "channel_wise": channel_wise,
        }
        source = _weights_source(spatial_dims, net, is_fake_3d)
        if source is None:  # MONAI core raises its own error for this configuration before loading anything
            super().__init__(**kwargs)
            return
        where = f"PerceptualLoss(network_type={net!r})"
        missing = _missing_packages(source)
        if missing:
            raise RuntimeError(
                f"{where} needs the package(s) {', '.join(missing)}, which are not installed: "
                f"pip install {' '.join(missing)} (or install this package with its 'lpips' extra)."
            )
        hub_dir = cache_dir or torch.hub.get_dir()

        if source == "hub":
            if pretrained_path is not None:
                raise ValueError(
                    f"{where} got pretrained_path={pretrained_path!r}, but this network can only come from torch hub; "
                    "pretrained_path is supported for 'alex', 'vgg', 'squeeze' and 'resnet50'."
                )
            repo_dir = os.path.join(hub_dir, HUB_REPO_DIR)
            if not os.path.isdir(repo_dir):
                raise RuntimeError(
                    f"{where} is fetched with torch.hub from GitHub '{HUB_REPO}', and downloads are not possible "
                    f"here. No cached copy at {repo_dir!r}: copy a torch hub folder holding it (and its cached "
                    "weights) from a machine with internet access and pass cache_dir=<that folder>."
                )
            super().__init__(**kwargs)
            return

        file_name = BACKBONE_FILES[net]
        if pretrained_path is not None and (source == "lpips" or pretrained):
            if not os.path.isfile(pretrained_path):
                raise ValueError(f"{where}: pretrained_path={pretrained_path!r} is not a file.")
            if source == "lpips":
                kwargs.update(cache_dir=None, pretrained_path=None, pretrained_state_dict_key=None)
                with _hub_dir_holding(file_name, pretrained_path, pretrained_state_dict_key):
                    super().__init__(**kwargs)
                return
        elif source == "lpips" or pretrained:
            cached = os.path.join(hub_dir, "checkpoints", file_name)
            if not os.path.isfile(cached):
                hint = " or pretrained=False for random weights" if source == "torchvision" else ""
                raise RuntimeError(
                    f"{where} needs the pretrained torchvision weights {file_name!r}, which are not at {cached!r}, "
                    f"and downloads are not possible here. Pass pretrained_path='/path/to/{file_name}' (a local "
                    f"torchvision state dict), put the file in <cache_dir>/checkpoints/ and pass cache_dir{hint}."
                )
        super().__init__(**kwargs)
