"""Regenerate tests/data/legacy_diffusion_0_2_3.pt from the real monai-generative 0.2.3 code.

Not run by the test suite. Usage (from the repository root):

    pip download --no-deps monai-generative==0.2.3 -d /tmp/mg && unzip -o /tmp/mg/*.whl -d /tmp/mg/src
    python tests/data/make_legacy_diffusion_fixture.py /tmp/mg/src

The fixture holds, for a few tiny DiffusionModelUNet / ControlNet configurations, the 0.2.3 state dict (weights
perturbed so that 0.2.3's zero-initialised output layers do not hide anything), an input and 0.2.3's output.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

CASES = {
    "unet_2d_self_attention": dict(
        net="DiffusionModelUNet",
        kwargs=dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            num_res_blocks=1,
            num_channels=(8, 8),
            attention_levels=(False, True),
            norm_num_groups=8,
            num_head_channels=4,
        ),
        shape=(1, 1, 16, 16),
    ),
    "unet_3d_cross_attention": dict(
        net="DiffusionModelUNet",
        kwargs=dict(
            spatial_dims=3,
            in_channels=1,
            out_channels=2,
            num_res_blocks=1,
            num_channels=(8, 8),
            attention_levels=(False, True),
            norm_num_groups=8,
            num_head_channels=4,
            resblock_updown=True,
            with_conditioning=True,
            cross_attention_dim=4,
            num_class_embeds=3,
        ),
        shape=(1, 1, 8, 8, 8),
    ),
    "controlnet_2d_self_attention": dict(
        net="ControlNet",
        kwargs=dict(
            spatial_dims=2,
            in_channels=1,
            num_res_blocks=1,
            num_channels=(8, 8),
            attention_levels=(False, True),
            norm_num_groups=8,
            num_head_channels=4,
            conditioning_embedding_num_channels=(8,),
        ),
        shape=(1, 1, 16, 16),
    ),
}


def main(src_root: str) -> None:
    sys.path.insert(0, src_root)
    unet_module = importlib.import_module("generative.networks.nets.diffusion_model_unet")
    controlnet_module = importlib.import_module("generative.networks.nets.controlnet")
    nets = {"DiffusionModelUNet": unet_module.DiffusionModelUNet, "ControlNet": controlnet_module.ControlNet}
    out = {}
    for name, case in CASES.items():
        torch.manual_seed(0)
        model = nets[case["net"]](**case["kwargs"]).eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        inputs = {"x": torch.randn(case["shape"]), "timesteps": torch.tensor([10])}
        if case["kwargs"].get("with_conditioning"):
            inputs.update(context=torch.randn(1, 3, 4), class_labels=torch.tensor([1]))
        if case["net"] == "ControlNet":
            inputs["controlnet_cond"] = torch.randn(case["shape"])
        with torch.no_grad():
            output = model(**inputs)
        out[name] = {
            "net": case["net"],
            "kwargs": case["kwargs"],
            "state_dict": model.state_dict(),
            "inputs": inputs,
            "output": output,
        }
    target = Path(__file__).with_name("legacy_diffusion_0_2_3.pt")
    torch.save(out, target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
