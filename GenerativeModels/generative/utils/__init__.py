# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Utilities of monai-generative 0.2.3 under their old names: MONAI core's classes and functions."""

from __future__ import annotations

from .component_store import ComponentStore
from .enums import AdversarialIterationEvents, AdversarialKeys, OrderingTransformations, OrderingType
from .misc import unsqueeze_left, unsqueeze_right
from .ordering import Ordering

__all__ = [
    "AdversarialIterationEvents",
    "AdversarialKeys",
    "ComponentStore",
    "Ordering",
    "OrderingTransformations",
    "OrderingType",
    "unsqueeze_left",
    "unsqueeze_right",
]
