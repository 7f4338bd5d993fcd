"""The classifier two-sample test (C2ST): the held-out accuracy of a small CNN trained to tell two sets of volumes
apart (0.5 = indistinguishable)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import EvaluateError
from .metrics import _check_same_shape, _check_volumes, _downsample, _round

C2ST_SIZE = {2: 64, 3: 32}  # largest side of the volumes the C2ST classifier sees


@dataclass(frozen=True)
class C2STSettings:
    """Settings of the classifier two-sample test.

    Args:
        epochs: training epochs of the classifier (0 skips the test).
        test_fraction: fraction of each class held out for testing.
        min_train: fewest training volumes per class.
        min_test: fewest test volumes per class.
        max_side: the volumes are area-downsampled to at most this largest side (default 32 in 3D, 64 in 2D).
        channels: output channels of the classifier's convolution blocks.
        batch_size: training batch size.
        lr: Adam learning rate.
    """

    epochs: int = 30
    test_fraction: float = 0.5
    min_train: int = 4
    min_test: int = 4
    max_side: int | None = None
    channels: tuple[int, ...] = (8, 16, 32)
    batch_size: int = 8
    lr: float = 3e-3

    def __post_init__(self) -> None:
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            raise EvaluateError(f"c2st epochs must be an integer >= 0, got {self.epochs!r}")
        if not 0.0 < self.test_fraction < 1.0:
            raise EvaluateError(f"c2st test_fraction must be in (0, 1), got {self.test_fraction!r}")
        if self.min_train < 1 or self.min_test < 1:
            raise EvaluateError(f"c2st min_train and min_test must be >= 1, got {self.min_train}, {self.min_test}")
        if self.batch_size < 1 or not self.lr > 0:
            raise EvaluateError(f"c2st batch_size must be >= 1 and lr > 0, got {self.batch_size}, {self.lr}")


def _split_sizes(n: int, cfg: C2STSettings) -> tuple[int, int]:
    n_test = int(math.floor(n * cfg.test_fraction))
    return n - n_test, n_test


def c2st_min_count(cfg: C2STSettings | None = None) -> int:
    """The fewest volumes each set needs for the C2ST split."""
    cfg = cfg or C2STSettings()
    n = 2
    while True:
        n_train, n_test = _split_sizes(n, cfg)
        if n_train >= cfg.min_train and n_test >= cfg.min_test:
            return n
        n += 1


def _check_c2st_counts(n_real: int, n_samples: int, cfg: C2STSettings, names: Mapping[str, str]) -> None:
    need = c2st_min_count(cfg)
    if min(n_real, n_samples) < need:
        raise EvaluateError(
            f"the classifier two-sample test needs at least {need} volumes in each set ({cfg.min_train} to train and "
            f"{cfg.min_test} to test per set, test fraction {cfg.test_fraction}), got {n_real} in "
            f"{names.get('real', 'real')} and {n_samples} in {names.get('samples', 'samples')}"
        )


class _C2STNet(torch.nn.Module):
    """MONAI convolution blocks (3x3, ReLU, no normalisation), global average and max pooling, one logit."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int]) -> None:
        super().__init__()
        from monai.networks.blocks import Convolution

        layers, prev = [], in_channels
        for i, ch in enumerate(channels):
            layers.append(
                Convolution(spatial_dims, prev, ch, strides=1 if i == 0 else 2, kernel_size=3, act="relu", norm=None)
            )
            prev = ch
        self.features = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(2 * prev, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x).flatten(2)
        return self.head(torch.cat([f.mean(dim=2), f.amax(dim=2)], dim=1)).reshape(-1)


def c2st_accuracy(
    real: torch.Tensor,
    samples: torch.Tensor,
    seed: int = 0,
    settings: C2STSettings | None = None,
    names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Classifier two-sample test: held-out accuracy of a small CNN trained to tell real from generated.

    Both sets are cut to the same size ``n = min(N_real, N_samples)`` (a seeded random choice), area-downsampled
    (``settings.max_side``), and each split into ``n_train`` training and ``n_test = floor(n * test_fraction)``
    test volumes. A small CNN (MONAI ``Convolution`` blocks: 3x3 kernels, stride 1 then 2, ReLU, no
    normalisation; global average and max pooling; one linear logit) is trained
    with Adam and binary cross-entropy for ``settings.epochs`` epochs; the accuracy on the ``2 * n_test`` held-out
    volumes is reported. 0.5 means indistinguishable, 1.0 trivially separable. Deterministic for a given seed.

    Args:
        real: reference volumes.
        samples: generated volumes, same shape.
        seed: seeds the choice, the split, the initialisation and the batch order.
        settings: the test's settings.
        names: labels of the two sets (``{"real": ..., "samples": ...}``) for error messages.

    Returns:
        ``{"accuracy", "train_per_set", "test_per_set", "epochs", "seed", "input_shape", "train_accuracy",
        "final_loss"}``.
    """
    cfg = settings or C2STSettings()
    names = names or {}
    _check_volumes(real, "real")
    _check_volumes(samples, "samples")
    _check_same_shape(real, samples, names.get("real", "real"), names.get("samples", "samples"))
    _check_c2st_counts(real.shape[0], samples.shape[0], cfg, names)
    n = min(real.shape[0], samples.shape[0])
    n_train, n_test = _split_sizes(n, cfg)
    rng = np.random.default_rng(seed)
    side = cfg.max_side or C2ST_SIZE[real.ndim - 2]
    with torch.no_grad():
        xr = _downsample(real[torch.from_numpy(rng.permutation(real.shape[0])[:n])], side)
        xs = _downsample(samples[torch.from_numpy(rng.permutation(samples.shape[0])[:n])], side)
    x_train = torch.cat([xr[:n_train], xs[:n_train]])
    y_train = torch.cat([torch.zeros(n_train), torch.ones(n_train)])
    x_test = torch.cat([xr[n_train:], xs[n_train:]])
    y_test = torch.cat([torch.zeros(n_test), torch.ones(n_test)])

    mean, std = x_train.mean(), x_train.std().clamp_min(1e-6)  # standardised with the training split's statistics
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    torch_rng = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = _C2STNet(x_train.ndim - 2, x_train.shape[1], cfg.channels)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    loss_value = float("nan")
    net.train()
    for _ in tqdm(range(cfg.epochs), desc="c2st classifier", leave=False):
        order = torch.randperm(x_train.shape[0], generator=torch_rng)
        for k in range(0, len(order), cfg.batch_size):
            idx = order[k : k + cfg.batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(net(x_train[idx]), y_train[idx])
            loss.backward()
            optimizer.step()
            loss_value = float(loss.detach())
    net.eval()
    with torch.no_grad():
        train_acc = float(((net(x_train) > 0).float() == y_train).float().mean())
        test_acc = float(((net(x_test) > 0).float() == y_test).float().mean())
    return {
        "accuracy": test_acc,
        "train_per_set": n_train,
        "test_per_set": n_test,
        "epochs": cfg.epochs,
        "seed": seed,
        "input_shape": list(x_train.shape[1:]),
        "train_accuracy": train_acc,
        "final_loss": _round(loss_value),
    }
