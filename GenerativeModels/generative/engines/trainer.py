# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``AdversarialTrainer`` (generator + discriminator + reconstruction loss): MONAI core's,
same arguments, defaults and events (``generative.utils.AdversarialIterationEvents``).
"""

from __future__ import annotations

from monai.engines.trainer import AdversarialTrainer

__all__ = ["AdversarialTrainer"]
