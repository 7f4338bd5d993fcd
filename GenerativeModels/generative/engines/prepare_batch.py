# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's diffusion batch preparation (noise + timesteps): MONAI core's classes, same arguments."""

from __future__ import annotations

from monai.engines.utils import DiffusionPrepareBatch, VPredictionPrepareBatch

__all__ = ["DiffusionPrepareBatch", "VPredictionPrepareBatch"]
