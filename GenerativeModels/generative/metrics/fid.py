# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's Fréchet Inception Distance: MONAI core's ``FIDMetric``, ``get_fid_score`` and
``compute_frechet_distance``, which take the same arguments. Like 0.2.3, the metric takes feature vectors
``(N, F)`` from a network of the user's choice; it loads no network itself.
"""

from __future__ import annotations

from monai.metrics.fid import FIDMetric, compute_frechet_distance, get_fid_score

__all__ = ["FIDMetric", "compute_frechet_distance", "get_fid_score"]
