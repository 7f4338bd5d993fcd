"""Generate NIfTI samples.  Usage: python monai_diffusion/3d_ldm/generate_samples.py --config FILE"""

import sys

from monai_diffusion.cli import generate_samples_main

if __name__ == "__main__":
    sys.exit(generate_samples_main())
