"""RSBCM's attention statistics inside SGLang's runtime, collected with ``--forward-hooks``.

SGLang registers PyTorch forward hooks from ``--forward-hooks`` (a JSON list of
``{name, target_modules, hook_factory, config}``, ``sglang/srt/model_executor/hook_manager.py``)
on the model of every scheduler process. :func:`attention_hook` is such a factory: the
hook sits on each layer's ``RadixAttention`` module (``model.layers.*.self_attn.attn``),
runs after the attention kernel (whichever backend: torch_native, FlashInfer, Triton), and
recomputes, for the sampled layers, the softmax attention weights of each request's
newest query over the keys in the KV pool. It does not touch the kernel's output.

Who owns what, in one scheduler process::

    KV pool (SGLang)     owns the K/V tensors; the hook only reads K
    SlotAttention        one float per KV slot (attention mass received), attached to the
                         pool object, so the model's hooks and the tree cache (which
                         reaches the pool through its allocator) find the same table
    RKSCRadixCache       ranks evictable nodes with RSBCM, reading the table

Mass per slot follows the embedded engine's rule (``rksc_sgl.rksc.rsbcm``): on every
``layer_stride``-th layer, a query's weights (mean over heads) are divided by the number
of sampled layers and added to its keys' slots, so one query adds a total mass of 1. The
queries counted are each decode token and, in an extend (prefill) pass, each request's last
prompt token. A slot's mass is reset when a pass writes new KV into it (its
``out_cache_loc``), since the allocator hands freed slots out again.

On a GPU with CUDA graphs, decode steps replayed from a graph run no Python hook: only
extend passes (and decode batches too large for the captured graphs) are seen. Launch with
``--disable-cuda-graph`` for decode statistics there (``README``: "SGLang runtime").
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any, Callable, Dict, Optional

import torch

__all__ = ["SlotAttention", "attention_hook", "slot_attention_of", "ATTENTION_MODULES", "hook_spec"]

ATTENTION_MODULES = "model.layers.*.self_attn.attn"
"""The ``RadixAttention`` modules of SGLang's Llama, Mistral, Qwen2 and Qwen3 models."""

HOOK_FACTORY = "rksc_sgl.runtime.attention_stats:attention_hook"
_POOL_ATTRIBUTE = "_rksc_slot_attention"


@dataclasses.dataclass
class SlotAttention:
    """The per-slot attention table of one KV pool, and what collecting it cost."""

    mass: torch.Tensor
    passes: int = 0
    queries: int = 0
    seconds: float = 0.0

    def as_dict(self) -> Dict[str, Any]:
        return {"passes": self.passes, "queries": self.queries, "seconds": round(self.seconds, 6),
                "slots_with_mass": int((self.mass > 0).sum())}


def slot_attention_of(pool) -> SlotAttention:
    """The table attached to SGLang KV pool ``pool`` (made on first use, one per pool)."""
    table = getattr(pool, _POOL_ATTRIBUTE, None)
    if table is None:
        slots = pool.get_key_buffer(pool.start_layer).shape[0]
        table = SlotAttention(torch.zeros(slots, dtype=torch.float32, device=pool.device))
        setattr(pool, _POOL_ATTRIBUTE, table)
    return table


def hook_spec(layer_stride: int) -> Dict[str, Any]:
    """The ``--forward-hooks`` entry that collects RSBCM's statistics every ``layer_stride`` layers."""
    return {"name": "rksc_attention", "target_modules": [ATTENTION_MODULES], "hook_factory": HOOK_FACTORY,
            "config": {"layer_stride": layer_stride}}


def attention_hook(config: Dict[str, Any]) -> Callable:
    """``--forward-hooks`` factory: the forward hook of one ``RadixAttention`` module type.

    ``config``: ``{"layer_stride": k}`` (default 4; layer ``i`` is sampled when
    ``i % k == 0``).
    """
    stride = config.get("layer_stride", 4)
    if not isinstance(stride, int) or isinstance(stride, bool) or stride < 1:
        raise ValueError(f"rksc_attention hook: layer_stride must be an integer >= 1, got {stride!r}")

    def hook(module, args, output):
        layer_id = getattr(module, "layer_id", None)
        if layer_id is None or layer_id % stride or len(args) < 4:
            return None
        from sglang.srt.model_executor.forward_context import get_req_to_token_pool, get_token_to_kv_pool

        started = time.perf_counter()
        q, forward_batch = args[0], args[3]
        pool = get_token_to_kv_pool()  # the pools of this forward (SGLang's forward context)
        table = slot_attention_of(pool)
        first = math.ceil(pool.start_layer / stride)  # this stage's sampled layers, in units of stride
        sampled = math.ceil((pool.start_layer + pool.layer_num) / stride) - first
        if layer_id == first * stride:  # a pass's first sampled layer: new KV slots start from 0
            table.mass[forward_batch.out_cache_loc.to(torch.int64)] = 0.0
        counted = _add_query_mass(module, q, forward_batch, get_req_to_token_pool().req_to_token,
                                  pool.get_key_buffer(layer_id), table.mass, 1.0 / max(sampled, 1))
        if layer_id == first * stride:
            table.passes += 1
            table.queries += counted
        table.seconds += time.perf_counter() - started
        return None

    return hook


def _query_rows(forward_batch) -> Optional[torch.Tensor]:
    """Row in ``q`` of each request's newest query token, or ``None`` for passes not counted."""
    mode = forward_batch.forward_mode
    if mode.is_decode():
        return torch.arange(forward_batch.batch_size, device=forward_batch.seq_lens.device)
    if mode.is_extend() and forward_batch.extend_seq_lens is not None:
        lengths = forward_batch.extend_seq_lens
        return torch.cumsum(lengths, 0) - 1
    return None


@torch.no_grad()
def _add_query_mass(module, q: torch.Tensor, forward_batch, req_to_token: torch.Tensor, keys: torch.Tensor,
                    mass: torch.Tensor, scale: float) -> int:
    """Add ``scale`` x each counted query's head-mean attention weights to its keys' slots."""
    rows = _query_rows(forward_batch)
    if rows is None or rows.numel() == 0:
        return 0
    heads, kv_heads, dim = module.tp_q_head_num, module.tp_k_head_num, module.qk_head_dim
    queries = q.reshape(-1, heads, dim)[rows.to(q.device)].float()
    lengths = forward_batch.seq_lens.tolist()
    rows_of_requests = forward_batch.req_pool_indices.tolist()
    group = heads // kv_heads
    for i, (row, length) in enumerate(zip(rows_of_requests, lengths)):
        slots = req_to_token[row, :length].to(torch.int64)
        k = keys[slots].float()  # (L, kv_heads, dim)
        query = queries[i].view(kv_heads, group, dim)
        scores = torch.einsum("hgd,lhd->hgl", query, k) * module.scaling
        weights = torch.softmax(scores, dim=-1).mean(dim=(0, 1))
        mass.index_add_(0, slots.to(mass.device), weights.to(mass.device) * scale)
    return len(lengths)
