"""Regenerate tests/data/legacy_dropin_0_2_3.pt from the real monai-generative 0.2.3 code.

Not run by the test suite. Usage (from the repository root):

    pip download --no-deps monai-generative==0.2.3 -d /tmp/mg && unzip -o /tmp/mg/*.whl -d /tmp/mg/src
    python tests/data/make_legacy_dropin_fixture.py /tmp/mg/src

For tiny configurations of the 0.2.3 networks and blocks whose MONAI core layout differs, or whose outputs we want to
pin (VQVAE, DecoderOnlyTransformer, SPADENet, SPADEAutoencoderKL, SPADEDiffusionModelUNet, SABlock,
TransformerBlock, SPADE), the fixture holds the 0.2.3 state dict (weights perturbed so that zero-initialised output
layers hide nothing), the inputs of one deterministic call, the name of the call and 0.2.3's output.
SPADENet is pinned through its decoder and encoder (its forward samples); 0.2.3's SPADENet with is_vae=False fails in
its own forward (it applies a linear layer to a spatial map), so there is no case for it.
"""

from __future__ import annotations

import copy
import importlib
import sys
from pathlib import Path

import torch

# name -> (module, class, constructor kwargs, call, input builder)
SPADE_UNET = dict(
    spatial_dims=2,
    in_channels=1,
    out_channels=1,
    label_nc=3,
    num_res_blocks=1,
    num_channels=(8, 8),
    attention_levels=(False, True),
    norm_num_groups=4,
    num_head_channels=4,
    spade_intermediate_channels=4,
)
CASES = {
    "vqvae_2d": (
        "generative.networks.nets.vqvae",
        "VQVAE",
        dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            num_channels=(4, 8),
            num_res_layers=1,
            num_res_channels=(4, 8),
            downsample_parameters=((2, 4, 1, 1), (2, 4, 1, 1)),
            upsample_parameters=((2, 4, 1, 1, 0), (2, 4, 1, 1, 0)),
            num_embeddings=8,
            embedding_dim=4,
        ),
        "forward",
        lambda: dict(images=torch.randn(2, 1, 16, 16)),
    ),
    "vqvae_3d": (
        "generative.networks.nets.vqvae",
        "VQVAE",
        dict(
            spatial_dims=3,
            in_channels=1,
            out_channels=1,
            num_channels=(4, 4),
            num_res_layers=1,
            num_res_channels=4,
            downsample_parameters=(2, 4, 1, 1),
            upsample_parameters=(2, 4, 1, 1, 0),
            num_embeddings=6,
            embedding_dim=2,
        ),
        "forward",
        lambda: dict(images=torch.randn(1, 1, 8, 8, 8)),
    ),
    "transformer": (
        "generative.networks.nets.transformer",
        "DecoderOnlyTransformer",
        dict(num_tokens=10, max_seq_len=12, attn_layers_dim=8, attn_layers_depth=2, attn_layers_heads=2),
        "forward",
        lambda: dict(x=torch.randint(0, 10, (2, 12))),
    ),
    "transformer_cross_attention": (
        "generative.networks.nets.transformer",
        "DecoderOnlyTransformer",
        dict(
            num_tokens=10,
            max_seq_len=12,
            attn_layers_dim=8,
            attn_layers_depth=2,
            attn_layers_heads=2,
            with_cross_attention=True,
        ),
        "forward",
        lambda: dict(x=torch.randint(0, 10, (2, 12)), context=torch.randn(2, 3, 8)),
    ),
    "spadenet_vae_decode": (
        "generative.networks.nets.spade_network",
        "SPADENet",
        dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            label_nc=3,
            input_shape=(16, 16),
            num_channels=[4, 8],
            z_dim=4,
            spade_intermediate_channels=4,
        ),
        "decode",
        lambda: dict(seg=torch.rand(2, 3, 16, 16), z=torch.randn(2, 4)),
    ),
    "spadenet_vae_encoder": (
        "generative.networks.nets.spade_network",
        "SPADENet",
        dict(
            spatial_dims=2,
            in_channels=1,
            out_channels=1,
            label_nc=3,
            input_shape=(16, 16),
            num_channels=[4, 8],
            z_dim=4,
            spade_intermediate_channels=4,
        ),
        "encoder",
        lambda: dict(x=torch.randn(2, 1, 16, 16)),
    ),
    "spade_autoencoderkl_2d": (
        "generative.networks.nets.spade_autoencoderkl",
        "SPADEAutoencoderKL",
        dict(
            spatial_dims=2,
            label_nc=3,
            in_channels=1,
            out_channels=1,
            num_res_blocks=1,
            num_channels=(4, 8),
            attention_levels=(False, True),
            latent_channels=2,
            norm_num_groups=4,
            spade_intermediate_channels=4,
        ),
        "reconstruct",
        lambda: dict(x=torch.randn(1, 1, 16, 16), seg=torch.rand(1, 3, 16, 16)),
    ),
    "spade_unet_2d_self_attention": (
        "generative.networks.nets.spade_diffusion_model_unet",
        "SPADEDiffusionModelUNet",
        SPADE_UNET,
        "forward",
        lambda: dict(x=torch.randn(1, 1, 16, 16), timesteps=torch.tensor([10]), seg=torch.rand(1, 3, 16, 16)),
    ),
    "spade_unet_3d_cross_attention": (
        "generative.networks.nets.spade_diffusion_model_unet",
        "SPADEDiffusionModelUNet",
        dict(
            SPADE_UNET,
            spatial_dims=3,
            with_conditioning=True,
            cross_attention_dim=4,
            resblock_updown=True,
            num_class_embeds=3,
        ),
        "forward",
        lambda: dict(
            x=torch.randn(1, 1, 8, 8, 8),
            timesteps=torch.tensor([10]),
            seg=torch.rand(1, 3, 8, 8, 8),
            context=torch.randn(1, 2, 4),
            class_labels=torch.tensor([1]),
        ),
    ),
    "sablock_causal": (
        "generative.networks.blocks.selfattention",
        "SABlock",
        dict(hidden_size=8, num_heads=2, qkv_bias=True, causal=True, sequence_length=6),
        "forward",
        lambda: dict(x=torch.randn(2, 6, 8)),
    ),
    "transformerblock_cross_attention": (
        "generative.networks.blocks.transformerblock",
        "TransformerBlock",
        dict(hidden_size=8, mlp_dim=16, num_heads=2, with_cross_attention=True),
        "forward",
        lambda: dict(x=torch.randn(2, 6, 8), context=torch.randn(2, 3, 8)),
    ),
    "spade_group_norm": (
        "generative.networks.blocks.spade_norm",
        "SPADE",
        dict(label_nc=3, norm_nc=4, spatial_dims=2, hidden_channels=8, norm=("GROUP", {"num_groups": 2})),
        "forward",
        lambda: dict(x=torch.randn(2, 4, 8, 8), segmap=torch.rand(2, 3, 8, 8)),
    ),
}


def main(src_root: str) -> None:
    sys.path.insert(0, src_root)
    out = {}
    for name, (module_name, class_name, kwargs, call, make_inputs) in CASES.items():
        cls = getattr(importlib.import_module(module_name), class_name)
        assert Path(sys.modules[module_name].__file__).is_relative_to(src_root), "not the 0.2.3 code"
        torch.manual_seed(0)
        model = cls(**copy.deepcopy(kwargs)).eval()  # 0.2.3's SPADENet appends to num_channels
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        inputs = make_inputs()
        with torch.no_grad():
            output = getattr(model, call)(**inputs)
        out[name] = {
            "module": module_name,
            "class": class_name,
            "kwargs": kwargs,
            "call": call,
            "state_dict": model.state_dict(),
            "inputs": inputs,
            "output": output,
        }
    target = Path(__file__).with_name("legacy_dropin_0_2_3.pt")
    torch.save(out, target)
    print(f"wrote {target} ({target.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
