# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Image-quality and distribution metrics of monai-generative 0.2.3, as thin layers over ``monai.metrics``."""

from __future__ import annotations

from .fid import FIDMetric
from .mmd import MMDMetric
from .ms_ssim import MultiScaleSSIMMetric
from .ssim import SSIMMetric

__all__ = ["FIDMetric", "MMDMetric", "MultiScaleSSIMMetric", "SSIMMetric"]
