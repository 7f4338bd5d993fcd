"""Evaluate generation quality.  Usage: python monai_diffusion/3d_ldm/evaluate.py --config FILE  (a trained pipeline)
or: python monai_diffusion/3d_ldm/evaluate.py --real DIR --samples DIR [--out FILE.json]  (two folders)"""

import sys

from monai_diffusion.cli import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
