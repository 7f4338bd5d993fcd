# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
Enums of monai-generative 0.2.3, now in ``monai.utils.enums`` with the same members and values.

``AdversarialIterationEvents`` is an ignite ``EventEnum``; like in 0.2.3, using it needs ``pytorch-ignite``, importing
it does not.
"""

from __future__ import annotations

from monai.utils.enums import AdversarialIterationEvents, AdversarialKeys, OrderingTransformations, OrderingType

__all__ = ["AdversarialIterationEvents", "AdversarialKeys", "OrderingTransformations", "OrderingType"]
