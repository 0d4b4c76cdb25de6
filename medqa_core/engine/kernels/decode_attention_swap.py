"""Our decode-attention kernel in place of the model's attention while a decoder runs.

transformers picks a model's attention function by name (``config._attn_implementation``) from its
``AttentionInterface``, and the mask's format from its ``AttentionMaskInterface``. :class:`DecodeAttentionSwap`
registers one more name, :data:`NAME`: one-token steps run :func:`medqa_core.engine.kernels.decode_attention.
decode_attention` (through a ``torch.library`` custom op, one opaque call for torch.compile and one launch in a
CUDA/HIP graph); everything else (a prefill, dropout, a soft cap, a position bias) runs transformers' SDPA function
as before, with SDPA's mask. ``with swap:`` sets the name on the model and puts the old one back on exit, so the
model is unchanged outside the block.
"""

from __future__ import annotations

from typing import Any

import torch

from medqa_core.engine.kernels.decode_attention import decode_attention

NAME = "medqa_decode"  # the attention implementation's name inside the block


@torch.library.custom_op("medqa_parity::decode_attention", mutates_args=())
def decode_attention_op(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                        scaling: float) -> torch.Tensor:
    """The custom op: [B, Hq, 1, D] (see decode_attention)."""
    return decode_attention(query, key, value, mask, scaling)


@decode_attention_op.register_fake
def _(query, key, value, mask, scaling):
    return torch.empty_like(query)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ours for one query token, transformers' SDPA otherwise.

    Returns:
        ([B, T, Hq, D], None), as transformers' functions return (no attention weights).
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    ours = (query.shape[2] == 1 and dropout == 0.0 and kwargs.get("softcap") is None
            and kwargs.get("position_bias") is None and not kwargs.get("output_attentions", False)
            and query.shape[-1] >= 16 and query.shape[-1] & (query.shape[-1] - 1) == 0)
    if not ours:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = torch.ops.medqa_parity.decode_attention(query, key, value, attention_mask, float(scale))
    return out.transpose(1, 2).contiguous(), None


def _register() -> None:
    """NAME in transformers' attention and mask registries (SDPA's mask format), once per process."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


class DecodeAttentionSwap:
    """Our decode attention in ``model``'s attention layers, inside ``with``.

    Args:
        model: a transformers model (or a peft model around one) whose attention follows the AttentionInterface.

    Raises:
        ValueError: the model cannot switch its attention function (an older architecture).
    """

    def __init__(self, model: Any) -> None:
        self.model = model.get_base_model() if hasattr(model, "get_base_model") else model
        if not getattr(self.model, "_can_set_attn_implementation", lambda: False)():
            raise ValueError(f"{type(self.model).__name__} cannot switch its attention function "
                             "(it does not follow transformers' AttentionInterface)")
        self._before: str | None = None

    def __enter__(self) -> DecodeAttentionSwap:
        _register()
        self._before = self.model.config._attn_implementation
        self.model.set_attn_implementation(NAME)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.model.set_attn_implementation(self._before)
