"""Evaluate generated volumes.  Usage: python monai_diffusion/3d_ldm/evaluate.py --real DIR --samples DIR [--out FILE.json]"""

import sys

from monai_diffusion.cli_evaluate import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
