# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Training engines of monai-generative 0.2.3, now in ``monai.engines`` with the same arguments and defaults.

They are pytorch-ignite engines: importing them needs nothing extra, running them needs ``pytorch-ignite``
(0.2.3 failed to import on current MONAI because of ``monai.config.IgniteInfo``, which MONAI removed).
"""

from __future__ import annotations

from .prepare_batch import DiffusionPrepareBatch, VPredictionPrepareBatch
from .trainer import AdversarialTrainer

__all__ = ["AdversarialTrainer", "DiffusionPrepareBatch", "VPredictionPrepareBatch"]
