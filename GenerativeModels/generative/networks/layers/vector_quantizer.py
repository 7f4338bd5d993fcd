# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's vector quantizers: MONAI core's ``EMAQuantizer`` and ``VectorQuantizer``, with the same
arguments, defaults and ``state_dict`` keys (``embedding.weight``, ``ema_cluster_size``, ``ema_w``), so 0.2.3
checkpoints load unchanged.
"""

from __future__ import annotations

from monai.networks.layers.vector_quantizer import EMAQuantizer, VectorQuantizer

__all__ = ["EMAQuantizer", "VectorQuantizer"]
