# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Layers of monai-generative 0.2.3: the vector quantizers, now MONAI core's."""

from __future__ import annotations

from .vector_quantizer import EMAQuantizer, VectorQuantizer

__all__ = ["EMAQuantizer", "VectorQuantizer"]
