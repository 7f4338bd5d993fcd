"""Regenerate tests/data/legacy_controlnet_inferer_0_2_3.pt from the real monai-generative 0.2.3 code.

Not run by the test suite. Usage (from the repository root):

    pip download --no-deps monai-generative==0.2.3 -d /tmp/mg && unzip -o /tmp/mg/*.whl -d /tmp/mg/src
    python tests/data/make_legacy_inferer_fixture.py /tmp/mg/src

For each conditioning mode, 0.2.3's ControlNetDiffusionInferer runs one training call with a 0.2.3 UNet and
ControlNet (weights perturbed so that zero-initialised layers hide nothing). The noise schedule is MONAI core's
DDPMScheduler (0.2.3's scheduler package no longer imports on current MONAI; the inferer only calls its
``add_noise``, whose formula did not change). The fixture holds both state dicts, the inputs and 0.2.3's output.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch
from monai.networks.schedulers import DDPMScheduler

COMMON = dict(
    spatial_dims=2,
    num_res_blocks=1,
    num_channels=(8, 8),
    attention_levels=(False, True),
    norm_num_groups=8,
    num_head_channels=4,
)
CASES = {
    # 0.2.3 tutorials: the ControlNet sees the image channels only and has no cross-attention
    "concat": dict(
        unet=dict(COMMON, in_channels=2, out_channels=1),
        controlnet=dict(COMMON, in_channels=1, conditioning_embedding_num_channels=(8,)),
        condition=(1, 1, 8, 8),
    ),
    "crossattn": dict(
        unet=dict(COMMON, in_channels=1, out_channels=1, with_conditioning=True, cross_attention_dim=3),
        controlnet=dict(COMMON, in_channels=1, conditioning_embedding_num_channels=(8,)),
        condition=(1, 2, 3),
    ),
}


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def main(src_root: str) -> None:
    sys.path.insert(0, src_root)
    unet_cls = importlib.import_module("generative.networks.nets.diffusion_model_unet").DiffusionModelUNet
    controlnet_cls = importlib.import_module("generative.networks.nets.controlnet").ControlNet
    inferer_cls = importlib.import_module("generative.inferers").ControlNetDiffusionInferer
    assert Path(sys.modules["generative"].__file__).is_relative_to(src_root), "not the 0.2.3 code"
    out = {}
    for mode, case in CASES.items():
        torch.manual_seed(0)
        unet = _perturbed(unet_cls(**case["unet"]))
        controlnet = _perturbed(controlnet_cls(**case["controlnet"]))
        inputs = dict(
            inputs=torch.randn(1, 1, 8, 8),
            noise=torch.randn(1, 1, 8, 8),
            timesteps=torch.tensor([3]),
            cn_cond=torch.randn(1, 1, 8, 8),
            condition=torch.randn(case["condition"]),
            mode=mode,
        )
        with torch.no_grad():
            output = inferer_cls(DDPMScheduler(num_train_timesteps=10))(
                diffusion_model=unet, controlnet=controlnet, **inputs
            )
        out[mode] = {
            "unet_kwargs": case["unet"],
            "controlnet_kwargs": case["controlnet"],
            "unet": unet.state_dict(),
            "controlnet": controlnet.state_dict(),
            "num_train_timesteps": 10,
            "inputs": inputs,
            "output": output,
        }
    target = Path(__file__).with_name("legacy_controlnet_inferer_0_2_3.pt")
    torch.save(out, target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
