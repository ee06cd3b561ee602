"""Moving cached keys to another position: RoPE applied on top of the rotation they have.

ASKS reuses a donor token's KV at a shifted position and a KV join lays branches one after
the other; both need a key as if it had been computed at its new position. Rotations
compose (R(p + d) = R(d) R(p)) for rotary embeddings whose frequencies do not depend on
the sequence (default, linear, llama3 scaling), so rotating by ``d`` is exact for those.
"""

from __future__ import annotations

import sys

import torch

ROTATABLE_ROPE = ("default", "linear", "llama3")  # rotary embeddings whose rotations compose


class KeyRotation:
    """``rotation(keys, delta)``: ``keys`` in the pool layout (n, kv_heads, head_dim) moved
    ``delta`` positions later, computed in float32 with the model's own rotary embedding."""

    def __init__(self, model):
        backbone = model.model
        self.rotary_emb = backbone.rotary_emb
        modeling = sys.modules[type(backbone.layers[0].self_attn).__module__]
        self.rotate_half = modeling.rotate_half  # what the model's apply_rotary_pos_emb uses
        self.device = next(model.parameters()).device

    @property
    def rope_type(self) -> str:
        return getattr(self.rotary_emb, "rope_type", "default")

    @property
    def supported(self) -> bool:
        """Whether rotations compose for this model's rotary embedding."""
        return self.rope_type in ROTATABLE_ROPE

    @torch.inference_mode()
    def __call__(self, keys: torch.Tensor, delta: int) -> torch.Tensor:
        if not self.supported:
            raise NotImplementedError(f"moving cached keys needs position-independent RoPE, not {self.rope_type!r}")
        probe = torch.zeros(1, dtype=torch.float32, device=self.device)
        cos, sin = self.rotary_emb(probe, torch.tensor([[delta]], device=self.device))
        scale = float(getattr(self.rotary_emb, "attention_scaling", 1.0))
        cos, sin = cos[0] / scale, sin[0] / scale  # (1, head_dim); the first rotation was scaled already
        k = keys.float()
        return k * cos + self.rotate_half(k) * sin
