"""Stage 1: train the autoencoder.  Usage: python monai_diffusion/3d_ldm/train_autoencoder.py --config FILE"""

import sys

from monai_diffusion.cli import train_autoencoder_main

if __name__ == "__main__":
    sys.exit(train_autoencoder_main())
