# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``Ordering`` (the order in which a transformer visits latent tokens): MONAI core's class.

The arguments, their order and the orderings produced are 0.2.3's. Core's defaults for ``reflected_spatial_dims``,
``transpositions_axes`` and ``rot90_axes`` are ``None`` where 0.2.3 had ``()``; both mean "none".
"""

from __future__ import annotations

from monai.utils.enums import OrderingTransformations, OrderingType
from monai.utils.ordering import Ordering

__all__ = ["Ordering", "OrderingTransformations", "OrderingType"]
