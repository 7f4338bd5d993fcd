"""Stage 2: train the latent diffusion UNet.  Usage: python monai_diffusion/3d_ldm/train_diffusion.py --config FILE"""

import sys

from monai_diffusion.cli import train_diffusion_main

if __name__ == "__main__":
    sys.exit(train_diffusion_main())
