"""ASKS keys above layer 0: a recipient's span keyed by the first layers of the model.

A tree node's key is the mean hidden state of its tokens at ``ASKSConfig.key_layer``, which
the forward stores per slot as it computes the slot's KV (``FeatureCapture``). To compare a
recipient with those keys, its span is run through the first ``key_layer`` blocks over its
exact prefix, in scratch slots given back right after the pass (the key cost, counted in
``EngineStats.key_tokens``). The scheduler hands this to ``KVCacheManager.match_alias``.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from rksc_sgl.kv.manager import KVCacheExhausted, KVCacheManager
from rksc_sgl.model.runner import ForwardItem, ModelRunner


class SpanKeys:
    """``span_keys(prefix_slots, span_ids)``: the span's hidden states at ``layer`` (one row
    per token), or None when the pool has no room for the scratch pass now (the request
    then matches exactly)."""

    def __init__(self, runner: ModelRunner, kv: KVCacheManager, layer: int):
        self.runner = runner
        self.kv = kv
        self.layer = layer

    def __call__(self, prefix_slots: torch.Tensor, span_ids: List[int]) -> Optional[torch.Tensor]:
        try:
            with self.kv.scratch(len(span_ids)) as scratch:
                item = ForwardItem(list(span_ids), len(prefix_slots), torch.cat([prefix_slots, scratch]))
                return self.runner.hidden_at([item], self.layer).float()
        except KVCacheExhausted:
            return None
