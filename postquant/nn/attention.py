"""`LinearAttention`: ``nn.MultiheadAttention`` rebuilt from four `nn.Linear` layers, so they can be quantized.

``nn.MultiheadAttention`` keeps its q/k/v projection as one packed parameter (``in_proj_weight``) and reads
``out_proj.weight`` as a tensor instead of calling ``out_proj``; PyTorch's fused inference paths
(``nn.TransformerEncoderLayer``) read every weight directly too. A quantized layer placed there would
never run. `LinearAttention` computes the same function by calling ``q_proj``, ``k_proj``, ``v_proj`` and
``out_proj``, with the same call signature and masks, so nearest rounding, SQuant, learned rounding and
activation quantizers all reach the attention's weights and inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["LinearAttention", "convertible"]


def convertible(mha: nn.MultiheadAttention) -> str | None:
    """None when `mha` can become a `LinearAttention`, else why not."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "add_bias_kv=True"
    if mha.add_zero_attn:
        return "add_zero_attn=True"
    return None


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    layer = layer.to(weight.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


class LinearAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out `nn.Linear` layers; a drop-in for ``nn.MultiheadAttention``.

    ``in_proj_weight`` and ``in_proj_bias`` are None: that tells PyTorch's transformer layers to take their
    unfused path, which calls this module (and the feed-forward layers) instead of reading raw weights.
    """

    in_proj_weight: None = None
    in_proj_bias: None = None
    _qkv_same_embed_dim = False

    def __init__(self, mha: nn.MultiheadAttention) -> None:
        super().__init__()
        reason = convertible(mha)
        if reason is not None:
            raise ValueError(f"nn.MultiheadAttention with {reason} has no LinearAttention equivalent")
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if mha.in_proj_bias is not None else (None,) * 3
        self.q_proj = _linear(weights[0], biases[0])
        self.k_proj = _linear(weights[1], biases[1])
        self.v_proj = _linear(weights[2], biases[2])
        out = mha.out_proj
        self.out_proj = _linear(out.weight.detach(), None if out.bias is None else out.bias.detach())
        self.embed_dim, self.num_heads, self.head_dim = e, mha.num_heads, mha.head_dim
        self.batch_first, self.dropout = mha.batch_first, mha.dropout
        self.train(mha.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """As ``nn.MultiheadAttention.forward`` (masks: True or -inf = not attended; ``is_causal`` without
        ``attn_mask`` applies the causal mask)."""
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        tgt, bsz, _ = query.shape  # (L, N, E) from here on, as PyTorch's reference
        src = key.shape[0]
        heads, hd = self.num_heads, self.head_dim

        def project(layer: nn.Module, x: Tensor, length: int) -> Tensor:
            """(L, N, D) -> (N * heads, L, head_dim)."""
            return layer(x).reshape(length, bsz * heads, hd).transpose(0, 1)

        q = project(self.q_proj, query, tgt)
        k = project(self.k_proj, key, src)
        v = project(self.v_proj, value, src)
        mask = self._mask(attn_mask, key_padding_mask, is_causal, tgt, src, bsz, query.dtype)
        scores = (q * math.sqrt(1.0 / hd)) @ k.transpose(-2, -1)
        if mask is not None:
            scores = scores + mask
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, p=self.dropout)
        out = (weights @ v).transpose(0, 1).reshape(tgt * bsz, self.embed_dim)
        out = self.out_proj(out).view(tgt, bsz, self.embed_dim)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        weights = weights.view(bsz, heads, tgt, src)
        weights = weights.mean(dim=1) if average_attn_weights else weights
        return out, weights.squeeze(0) if unbatched else weights

    def _mask(
        self,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        is_causal: bool,
        tgt: int,
        src: int,
        bsz: int,
        dtype: torch.dtype,
    ) -> Tensor | None:
        """One additive mask of shape (N * heads, L, S) (or broadcastable), -inf where not attended."""
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=self.q_proj.weight.device).triu(1)
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, dtype)
            mask = mask.unsqueeze(0) if mask.dim() == 2 else mask
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, dtype).view(bsz, 1, 1, src).expand(-1, self.num_heads, -1, -1)
            pad = pad.reshape(bsz * self.num_heads, 1, src)
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)
