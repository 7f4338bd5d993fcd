# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's multi-scale SSIM: MONAI core's ``MultiScaleSSIMMetric``, same arguments and defaults."""

from __future__ import annotations

from monai.metrics.regression import KernelType, MultiScaleSSIMMetric, compute_ms_ssim

__all__ = ["KernelType", "MultiScaleSSIMMetric", "compute_ms_ssim"]
