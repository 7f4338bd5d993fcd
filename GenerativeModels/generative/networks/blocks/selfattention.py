# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""
monai-generative 0.2.3's ``SABlock`` on top of MONAI core's ``CrossAttentionBlock``.

0.2.3's block had separate ``to_q``/``to_k``/``to_v`` projections and an optional ``context`` in ``forward``. MONAI
core's ``SABlock`` fuses q, k and v by default and has no ``context``; core's ``CrossAttentionBlock`` has exactly
0.2.3's layers, keys and computation, so it is the base here.
"""

from __future__ import annotations

from monai.networks.blocks.crossattention import CrossAttentionBlock

__all__ = ["SABlock"]


class SABlock(CrossAttentionBlock):
    """
    Multi-head (self- or cross-) attention with monai-generative 0.2.3's arguments and ``state_dict`` keys.

    ``forward(x, context=None)`` attends from ``x`` (``(B, T, hidden_size)``) to ``context`` (``(B, S,
    hidden_size)``), or to ``x`` itself when ``context`` is ``None``.

    Differences from 0.2.3:
        - ``use_flash_attention`` uses PyTorch's ``scaled_dot_product_attention`` (0.2.3 required xformers).

    Args:
        hidden_size: feature size of the tokens.
        num_heads: number of attention heads; must divide ``hidden_size``.
        dropout_rate: dropout of the attention weights and of the output, in [0, 1].
        qkv_bias: whether the q/k/v projections have a bias.
        causal: mask attention to later tokens.
        sequence_length: maximum sequence length; required when ``causal``.
        with_cross_attention: kept from 0.2.3, where it only recorded the intent; ``context`` decides.
        use_flash_attention: use PyTorch's fused attention kernel.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        causal: bool = False,
        sequence_length: int | None = None,
        with_cross_attention: bool = False,
        use_flash_attention: bool = False,
    ) -> None:
        super().__init__(
            hidden_size=hidden_size,
            num_heads=num_heads,
            dropout_rate=dropout_rate,
            qkv_bias=qkv_bias,
            causal=causal,
            sequence_length=sequence_length,
            use_flash_attention=use_flash_attention,
        )
        self.hidden_size = hidden_size
        self.with_cross_attention = with_cross_attention
