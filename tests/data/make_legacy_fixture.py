"""Regenerate tests/data/legacy_aekl_0_2_3.pt from the real monai-generative 0.2.3 code.

Not run by the test suite. Usage (from the repository root):

    pip download --no-deps monai-generative==0.2.3 -d /tmp/mg && unzip -o /tmp/mg/*.whl -d /tmp/mg/src
    python tests/data/make_legacy_fixture.py /tmp/mg/src/generative/networks/nets/autoencoderkl.py

The 0.2.3 module is loaded from its file because the 0.2.3 package no longer imports as a whole on current MONAI.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

CASES = {
    "3d_attention": dict(
        spatial_dims=3,
        in_channels=1,
        out_channels=1,
        num_channels=(8, 16),
        attention_levels=(False, True),
        num_res_blocks=1,
        latent_channels=3,
        norm_num_groups=8,
        shape=(2, 1, 8, 8, 8),
    ),
    "2d_convtranspose": dict(
        spatial_dims=2,
        in_channels=2,
        out_channels=1,
        num_channels=(8, 8, 16),
        attention_levels=(False, False, True),
        num_res_blocks=(1, 2, 1),
        latent_channels=2,
        norm_num_groups=8,
        use_convtranspose=True,
        shape=(1, 2, 16, 16),
    ),
}


def main(legacy_file: str) -> None:
    spec = importlib.util.spec_from_file_location("legacy_autoencoderkl", legacy_file)
    legacy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(legacy)
    out = {}
    for name, case in CASES.items():
        kwargs = dict(case)
        shape = kwargs.pop("shape")
        torch.manual_seed(0)
        model = legacy.AutoencoderKL(**kwargs).eval()
        x = torch.randn(shape)
        with torch.no_grad():
            recon = model.reconstruct(x)
            z_mu, z_sigma = model.encode(x)
        out[name] = {
            "kwargs": kwargs,
            "state_dict": model.state_dict(),
            "input": x,
            "reconstruction": recon,
            "z_mu": z_mu,
            "z_sigma": z_sigma,
        }
    target = Path(__file__).with_name("legacy_aekl_0_2_3.pt")
    torch.save(out, target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
