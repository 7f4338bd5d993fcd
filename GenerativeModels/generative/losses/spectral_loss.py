# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``JukeboxLoss``, which MONAI core now provides with the same arguments and defaults
(``spatial_dims``, ``fft_signal_size=None``, ``fft_norm="ortho"``, ``reduction="mean"``).
"""

from __future__ import annotations

from monai.losses import JukeboxLoss

__all__ = ["JukeboxLoss"]
