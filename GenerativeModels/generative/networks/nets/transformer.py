# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""monai-generative 0.2.3 ``DecoderOnlyTransformer`` on top of MONAI core's, loading 0.2.3 checkpoints."""

from __future__ import annotations

from monai.networks.nets.transformer import AbsolutePositionalEmbedding
from monai.networks.nets.transformer import DecoderOnlyTransformer as _CoreDecoderOnlyTransformer

from ._compat import add_generative_023_load_hook

__all__ = ["AbsolutePositionalEmbedding", "DecoderOnlyTransformer"]


class DecoderOnlyTransformer(_CoreDecoderOnlyTransformer):
    """
    ``monai.networks.nets.DecoderOnlyTransformer`` with 0.2.3's positional order, loading 0.2.3 checkpoints.

    Differences from MONAI core:
        - Positional order is 0.2.3's: ``use_flash_attention`` follows ``embedding_dropout_rate``; core's
          ``include_fc`` and ``use_combined_linear`` are keyword-only (defaults ``True`` and ``False``, 0.2.3's layout).
        - ``load_state_dict`` converts 0.2.3 keys: in each block 0.2.3's ``norm2`` (cross-attention) becomes core's
          ``norm_cross_attn`` and ``norm3`` (MLP) becomes ``norm2``. Outputs are 0.2.3's (checked against a fixture
          written by 0.2.3). Core's own ``load_old_state_dict`` puts the cross-attention norm in the MLP's place when
          the model has cross-attention; this class's ``load_old_state_dict`` is ``load_state_dict``.
        - ``use_flash_attention`` uses PyTorch's fused attention (0.2.3 required xformers).

    Args:
        num_tokens: size of the vocabulary.
        max_seq_len: maximum sequence length.
        attn_layers_dim: feature size of the tokens.
        attn_layers_depth: number of transformer blocks.
        attn_layers_heads: number of attention heads.
        with_cross_attention: add cross-attention to ``forward``'s ``context``.
        embedding_dropout_rate: dropout after the embeddings.
        use_flash_attention: use PyTorch's fused attention kernel.
        include_fc: give the self-attention layers an output projection (0.2.3 always had one).
        use_combined_linear: one fused q/k/v projection (core's layout; 0.2.3 checkpoints need ``False``).
    """

    def __init__(
        self,
        num_tokens: int,
        max_seq_len: int,
        attn_layers_dim: int,
        attn_layers_depth: int,
        attn_layers_heads: int,
        with_cross_attention: bool = False,
        embedding_dropout_rate: float = 0.0,
        use_flash_attention: bool = False,
        *,
        include_fc: bool = True,
        use_combined_linear: bool = False,
    ) -> None:
        super().__init__(
            num_tokens=num_tokens,
            max_seq_len=max_seq_len,
            attn_layers_dim=attn_layers_dim,
            attn_layers_depth=attn_layers_depth,
            attn_layers_heads=attn_layers_heads,
            with_cross_attention=with_cross_attention,
            embedding_dropout_rate=embedding_dropout_rate,
            include_fc=include_fc,
            use_combined_linear=use_combined_linear,
            use_flash_attention=use_flash_attention,
        )
        add_generative_023_load_hook(self)

    def load_old_state_dict(self, old_state_dict: dict, verbose: bool = False) -> None:
        """
        Load a monai-generative 0.2.3 state dict; same as ``load_state_dict``, which converts old keys itself.

        Args:
            old_state_dict: state dict saved by 0.2.3 (or by this class / MONAI core).
            verbose: kept for compatibility with MONAI core's method; unused.
        """
        self.load_state_dict(old_state_dict)
