# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3's ``TransformerBlock`` on top of MONAI core's, loading 0.2.3 checkpoints."""

from __future__ import annotations

from monai.networks.blocks.transformerblock import TransformerBlock as _CoreTransformerBlock

from ..nets._compat import add_generative_023_load_hook

__all__ = ["TransformerBlock"]


class TransformerBlock(_CoreTransformerBlock):
    """
    Pre-norm transformer block (self-attention, optional cross-attention, MLP) with 0.2.3's arguments.

    Differences from MONAI core's ``TransformerBlock``:
        - Positional order is 0.2.3's (core inserts ``save_attn`` after ``qkv_bias``); core's ``include_fc`` and
          ``use_combined_linear`` are keyword-only, and ``use_combined_linear`` defaults to ``False`` so that the
          keys are 0.2.3's (``attn.to_q``/``to_k``/``to_v``).
        - ``load_state_dict`` accepts 0.2.3 keys: 0.2.3's ``norm2`` (before cross-attention) is core's
          ``norm_cross_attn`` and 0.2.3's ``norm3`` (before the MLP) is core's ``norm2``.
        - ``use_flash_attention`` uses PyTorch's fused attention (0.2.3 required xformers).

    Args:
        hidden_size: feature size of the tokens.
        mlp_dim: hidden size of the MLP.
        num_heads: number of attention heads; must divide ``hidden_size``.
        dropout_rate: dropout, in [0, 1].
        qkv_bias: whether the q/k/v projections have a bias.
        causal: causal self-attention.
        sequence_length: maximum sequence length; required when ``causal``.
        with_cross_attention: add a cross-attention layer fed by ``forward``'s ``context``.
        use_flash_attention: use PyTorch's fused attention kernel.
        include_fc: give the self-attention an output projection (0.2.3 always had one).
        use_combined_linear: one fused q/k/v projection (core's layout; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        hidden_size: int,
        mlp_dim: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = False,
        sequence_length: int | None = None,
        with_cross_attention: bool = False,
        use_flash_attention: bool = False,
        *,
        include_fc: bool = True,
        use_combined_linear: bool = False,
    ) -> None:
        super().__init__(
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_heads=num_heads,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            causal=causal,
            sequence_length=sequence_length,
            with_cross_attention=with_cross_attention,
            use_flash_attention=use_flash_attention,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
        )
        add_generative_023_load_hook(self)
