"""``python -m monai_diffusion.plan``: the same as the ``monai-diffusion-plan`` console script."""

from . import plan_main

raise SystemExit(plan_main())
