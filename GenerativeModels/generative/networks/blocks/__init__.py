# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Building blocks of monai-generative 0.2.3: MONAI core's, with 0.2.3's argument names and checkpoint keys."""

from __future__ import annotations

from .encoder_modules import SpatialRescaler
from .selfattention import SABlock
from .spade_norm import SPADE
from .transformerblock import TransformerBlock

__all__ = ["SABlock", "SPADE", "SpatialRescaler", "TransformerBlock"]
