# Copyright (c) monai-diffusion contributors
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#     http://www.apache.org/licenses/LICENSE-2.0
"""Helpers shared by the 0.2.3-compatible network wrappers: renamed arguments and old checkpoint keys."""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
import torch.nn as nn

__all__ = ["REQUIRED", "pick_renamed_arg", "upgrade_generative_023_keys", "add_generative_023_load_hook"]

REQUIRED: Any = object()
"""Marker for ``pick_renamed_arg``: the argument has no default and one of its two names must be given."""


def pick_renamed_arg(owner: str, old_name: str, old_value: Any, new_name: str, new_value: Any, default: Any) -> Any:
    """
    Return the value of an argument that monai-generative 0.2.3 and MONAI core spell differently.

    Args:
        owner: class name, used in error messages.
        old_name: the 0.2.3 spelling, e.g. ``"num_channels"``.
        old_value: what the caller gave for ``old_name`` (``None`` when left out).
        new_name: the MONAI core spelling, e.g. ``"channels"``.
        new_value: what the caller gave for ``new_name`` (``None`` when left out).
        default: value used when neither name is given; ``REQUIRED`` makes that a ``TypeError``.

    Raises:
        TypeError: when both names are given, or when neither is given and there is no default.
    """
    if old_value is not None and new_value is not None:
        raise TypeError(
            f"{owner}() got both '{old_name}'={old_value!r} (monai-generative 0.2.3 name) and "
            f"'{new_name}'={new_value!r} (MONAI core name) for the same argument; pass only one of them."
        )
    if old_value is not None:
        return old_value
    if new_value is not None:
        return new_value
    if default is REQUIRED:
        raise TypeError(f"{owner}() missing required argument '{old_name}' (MONAI core name: '{new_name}').")
    return default


# 0.2.3 key suffix -> MONAI core key suffix. Each rule is applied only where the old key is unknown to the target
# model and the rewritten key is one the model expects, so state dicts already in core layout pass through untouched.
_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = (
    # self-attention blocks: core nests q/k/v inside an ``attn`` (SABlock) sub-module
    (re.compile(r"\.to_([qkv])\.(weight|bias)$"), r".attn.to_\1.\2"),
    # cross-attention blocks: ``to_out`` was an nn.Sequential(Linear, Dropout), core has a single ``out_proj``
    (re.compile(r"\.to_out\.0\.(weight|bias)$"), r".out_proj.\1"),
    # upsampling convolution after interpolation was renamed ``postconv``
    (re.compile(r"\.upsampler\.conv\.conv\.(weight|bias)$"), r".upsampler.postconv.conv.\1"),
    # the same renaming in the upsampling blocks of SPADEAutoencoderKL's decoder
    (re.compile(r"\.conv\.conv\.(weight|bias)$"), r".postconv.conv.\1"),
    # SPADE: 0.2.3 wrapped the parameter-free norm in an ADN block (sub-module ``N``), core holds the norm itself
    (re.compile(r"\.param_free_norm\.N\.(weight|bias|running_mean|running_var|num_batches_tracked)$"),
     r".param_free_norm.\1"),
)
# transformer blocks: 0.2.3 had norm1 (self-attention), norm2 (cross-attention), norm3 (MLP); core has norm1,
# norm_cross_attn and norm2 (MLP)
_NORM3 = re.compile(r"\.norm3\.(weight|bias)$")
_PROJ_ATTN = re.compile(r"\.proj_attn\.(weight|bias)$")


def upgrade_generative_023_keys(
    state_dict: MutableMapping[str, Any],
    expected: set[str],
    prefix: str = "",
    current: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """
    Rewrite, in place, the keys of a monai-generative 0.2.3 state dict (``DiffusionModelUNet``, ``ControlNet``, the
    SPADE networks, ``DecoderOnlyTransformer``, ``TransformerBlock``) to the MONAI core layout.

    0.2.3's self-attention block created a ``proj_attn`` linear layer but never applied it in ``forward``; core's
    block applies its ``out_proj``. To keep the outputs of an old checkpoint unchanged, ``proj_attn`` is therefore not
    copied: the matching ``out_proj`` is set to the identity (weight ``I``, bias ``0``), or dropped when the target
    model has no output projection (``include_fc=False``).

    Args:
        state_dict: the state dict to update; keys already known to the target are left alone.
        expected: the full key names (``prefix`` included) that the target model expects.
        prefix: the target model's prefix inside ``state_dict`` (non-empty when it is a sub-module).
        current: the target model's own tensors under the same full key names. MONAI before 1.6 gives every
            transformer block a cross-attention layer, used only with cross-attention; for a 0.2.3 block without
            cross-attention (which has no such weights) the target keeps its own, unused ones.
    """
    _upgrade_transformer_norms(state_dict, expected, prefix, current)
    for key in [k for k in state_dict if k.startswith(prefix) and k not in expected]:
        dotted = "." + key  # so that the patterns also match keys of a module loaded on its own (no parent prefix)
        proj = _PROJ_ATTN.search(dotted)
        if proj is not None:
            block = dotted[1 : proj.start()]
            target = _join(block, f"attn.out_proj.{proj.group(1)}")
            old = state_dict.pop(key)
            if target in expected and target not in state_dict:
                if proj.group(1) == "weight":
                    state_dict[target] = torch.eye(old.shape[0], old.shape[1], dtype=old.dtype, device=old.device)
                else:
                    state_dict[target] = torch.zeros_like(old)
            elif target in expected or not any(k.startswith(_join(block, "attn.")) for k in expected):
                state_dict[key] = old  # not a 0.2.3 self-attention block after all: let the normal checks report it
            # otherwise: a core attention block built with include_fc=False, where the unused weights just go
            continue
        for pattern, replacement in _RENAMES:
            new_key = pattern.sub(replacement, dotted)[1:]
            if new_key != key and new_key in expected and new_key not in state_dict:
                state_dict[new_key] = state_dict.pop(key)
                break


def _join(block: str, rest: str) -> str:
    """``block.rest``, or ``rest`` when ``block`` is the module itself (empty)."""
    return f"{block}.{rest}" if block else rest


def _upgrade_transformer_norms(
    state_dict: MutableMapping[str, Any],
    expected: set[str],
    prefix: str,
    current: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Rename 0.2.3 transformer-block norms (``norm2`` -> ``norm_cross_attn``, ``norm3`` -> ``norm2``) in place."""
    for key in [k for k in state_dict if k.startswith(prefix) and k not in expected]:
        dotted = "." + key
        match = _NORM3.search(dotted)
        if match is None:
            continue
        block, param = dotted[1 : match.start()], match.group(1)
        mlp_norm, cross_norm = _join(block, f"norm2.{param}"), _join(block, f"norm_cross_attn.{param}")
        if mlp_norm not in expected:
            continue  # not a 0.2.3 transformer block: let the normal checks report the key
        if mlp_norm in state_dict:
            if cross_norm not in expected:
                continue  # a cross-attention norm the target has no place for: leave it to the normal checks
            state_dict[cross_norm] = state_dict.pop(mlp_norm)
        elif cross_norm in expected and cross_norm not in state_dict:
            # core always creates ``norm_cross_attn``; without cross-attention it is unused: LayerNorm's initial values
            norm3 = state_dict[key]
            state_dict[cross_norm] = torch.ones_like(norm3) if param == "weight" else torch.zeros_like(norm3)
            if current is not None:  # MONAI < 1.6: the block's unused cross-attention layer keeps its own weights
                unused = _join(block, "cross_attn.")
                for name in expected:
                    if name.startswith(unused) and name not in state_dict and name in current:
                        state_dict[name] = current[name]
        state_dict[mlp_norm] = state_dict.pop(key)


def _load_hook(
    module: nn.Module,
    state_dict: MutableMapping[str, Any],
    prefix: str,
    local_metadata: dict,
    strict: bool,
    missing_keys: list[str],
    unexpected_keys: list[str],
    error_msgs: list[str],
) -> None:
    own = {prefix + k: v.detach() for k, v in module.state_dict(keep_vars=True).items()}
    upgrade_generative_023_keys(state_dict, set(own), prefix, own)


def add_generative_023_load_hook(module: nn.Module) -> None:
    """
    Make ``module.load_state_dict`` (and that of any model holding ``module``) accept 0.2.3 checkpoint keys.

    Args:
        module: a MONAI core network or block (or a subclass) whose 0.2.3 keys ``upgrade_generative_023_keys`` knows.
    """
    module.register_load_state_dict_pre_hook(_load_hook)
