"""monai-diffusion: 3D latent diffusion for NIfTI volumes, built on MONAI.

The importable library behind the ``3d_ldm`` scripts: settings, data, models and
the training loop. The patched MONAI Generative Models fork lives in the separate
``generative`` package.
"""

__version__ = "0.1.0"
