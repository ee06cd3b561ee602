"""Run a Hugging Face decoder over KV stored in SGLang's token pool.

One forward handles a ragged batch: every item brings new tokens for one request row
(a prefill of a whole prompt, the suffix after a cached prefix, or one decode token).
Linear layers run over all new tokens of the batch at once; attention runs per item
over the keys gathered from the pool through that request's row of ``ReqToTokenPool``.
Branches of a fork therefore read the very same prefix slots: nothing is copied.

The layer code reuses the model's own modules (projections, norms, MLP, rotary
embedding) so the arithmetic is the one ``transformers`` does; only the KV storage and
the attention call differ. Supported layouts: Llama-style decoders (``llama``,
``mistral``, ``qwen2``, and ``qwen3`` with its q/k norms).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import List, Optional

import torch
import torch.nn.functional as F

from .kv_cache import KVLayout


@dataclasses.dataclass
class ForwardItem:
    """New tokens of one request, to be appended after ``start`` cached tokens.

    ``slots`` is the request's full row (cached prefix + slots for the new tokens), as
    pool indices. ``logit_positions`` are indices into the new tokens whose next-token
    logits the caller wants (default: only the last one).
    """

    token_ids: List[int]
    start: int
    slots: torch.Tensor
    logit_positions: Optional[List[int]] = None

    def __post_init__(self):
        assert len(self.slots) == self.start + len(self.token_ids)


class ModelRunner:
    """Owns the model weights and computes logits for ragged batches of new tokens."""

    def __init__(self, model, kv_pool):
        self.model = model
        self.kv_pool = kv_pool
        self.config = model.config
        backbone = model.model
        self.embed_tokens = backbone.embed_tokens
        self.layers = backbone.layers
        self.norm = backbone.norm
        self.rotary_emb = backbone.rotary_emb
        self.lm_head = model.lm_head
        self.apply_rotary = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        attn = self.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.num_heads = self.config.num_attention_heads
        self.num_kv_heads = self.config.num_key_value_heads
        self.scaling = attn.scaling
        self.has_qk_norm = hasattr(attn, "q_norm")

    @staticmethod
    def layout_of(model) -> KVLayout:
        config = model.config
        attn = model.model.layers[0].self_attn
        return KVLayout(
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=attn.head_dim,
            dtype=next(model.parameters()).dtype,
        )

    @torch.inference_mode()
    def forward(self, items: List[ForwardItem]) -> List[torch.Tensor]:
        """Write the new tokens' KV into the pool; return, per item, logits (n_pos, vocab)."""
        ids = torch.tensor([t for it in items for t in it.token_ids], dtype=torch.long)
        positions = torch.cat([torch.arange(it.start, it.start + len(it.token_ids)) for it in items])
        new_slots = torch.cat([it.slots[it.start :] for it in items])
        hidden = self.embed_tokens(ids)[None]  # (1, T, H): the model's own batch layout
        cos, sin = self.rotary_emb(hidden, positions[None])
        for layer_id, layer in enumerate(self.layers):
            hidden = self._layer(layer_id, layer, hidden, cos, sin, items, new_slots)
        hidden = self.norm(hidden)[0]
        return self._logits(hidden, items)

    def _layer(self, layer_id, layer, hidden, cos, sin, items, new_slots):
        residual = hidden
        x = layer.input_layernorm(hidden)
        hidden = residual + self._attention(layer_id, layer.self_attn, x, cos, sin, items, new_slots)
        residual = hidden
        return residual + layer.mlp(layer.post_attention_layernorm(hidden))

    def _attention(self, layer_id, attn, x, cos, sin, items, new_slots):
        total = x.shape[1]
        q = attn.q_proj(x).view(1, total, -1, self.head_dim)
        k = attn.k_proj(x).view(1, total, -1, self.head_dim)
        v = attn.v_proj(x).view(1, total, -1, self.head_dim)
        if self.has_qk_norm:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = self.apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
        # Pool layout is (slot, kv_head, head_dim).
        k_buf = self.kv_pool.get_key_buffer(layer_id)
        v_buf = self.kv_pool.get_value_buffer(layer_id)
        k_buf[new_slots] = k[0].transpose(0, 1).to(k_buf.dtype)
        v_buf[new_slots] = v[0].to(v_buf.dtype)
        outs = []
        offset = 0
        for it in items:
            n = len(it.token_ids)
            q_i = q[:, :, offset : offset + n]
            keys = k_buf[it.slots].transpose(0, 1)[None].to(q.dtype)
            values = v_buf[it.slots].transpose(0, 1)[None].to(q.dtype)
            outs.append(self._sdpa(q_i, keys, values, it.start))
            offset += n
        out = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, total, -1)
        return attn.o_proj(out)

    def _sdpa(self, q, keys, values, start):
        """Causal attention of ``n`` new queries over ``start + n`` keys."""
        n = q.shape[2]
        if n == 1:
            return F.scaled_dot_product_attention(q, keys, values, scale=self.scaling, enable_gqa=True)
        if start == 0:
            return F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=self.scaling, enable_gqa=True)
        total = keys.shape[2]
        mask = torch.arange(total)[None, :] <= (start + torch.arange(n))[:, None]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling, enable_gqa=True)

    def _logits(self, hidden, items):
        picks, counts, offset = [], [], 0
        for it in items:
            n = len(it.token_ids)
            pos = it.logit_positions if it.logit_positions is not None else [n - 1]
            picks.extend(offset + p for p in pos)
            counts.append(len(pos))
            offset += n
        if not picks:
            return [hidden.new_zeros((0, self.lm_head.out_features)) for _ in items]
        logits = self.lm_head(hidden[torch.tensor(picks)]).float()
        return list(torch.split(logits, counts))
