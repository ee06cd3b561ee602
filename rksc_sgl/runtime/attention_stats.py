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
``layer_stride``-th layer, a query's weights (mean over this rank's heads) are divided by
the number of sampled layers and added to its keys' slots, so one query adds a total mass
of 1. The queries counted are each decode token and, in an extend (prefill) pass, each
request's last prompt token. The hook runs device operations only (lengths come from
SGLang's host copy ``seq_lens_cpu``; requests are batched in chunks of at most
``CHUNK_KEYS`` keys), so a pass never waits for the device.

Fresh slots start from 0: with ``rsbcm`` the cache factory registers
:func:`reset_allocated` on SGLang's allocators, so a slot handed out again drops its previous
owner's mass whether or not a hook sees the pass that writes it (the hook also resets a
pass's ``out_cache_loc``).

On a GPU with CUDA graphs (decode graphs by default, and SGLang 0.5.23's breakable prefill
graphs), passes replayed from a graph run no Python hook: RSBCM then sees only the passes
run eagerly. The plugin says so at start-up, with the flags that give full statistics
(``--disable-cuda-graph``, or ``--disable-decode-cuda-graph`` / ``--disable-prefill-cuda-graph``).
On tensor-parallel ranks each rank sees its own heads; evictions combine the ranks' sums
(``rksc_sgl.runtime.rank_consistency``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["SlotAttention", "attention_hook", "slot_attention_of", "watch_usage", "ATTENTION_MODULES", "hook_spec"]

ATTENTION_MODULES = "model.layers.*.self_attn.attn"
"""The ``RadixAttention`` modules of SGLang's Llama, Mistral, Qwen2 and Qwen3 models."""

HOOK_FACTORY = "rksc_sgl.runtime.attention_stats:attention_hook"
_POOL_ATTRIBUTE = "_rksc_slot_attention"


@dataclasses.dataclass
class SlotAttention:
    """The per-slot attention table of one KV pool, what collecting it cost, and the switch
    that collects only near a full pool.

    ``watch_free``: the hook collects while the allocator has fewer free slots than this
    (``None``: always); :meth:`watch` sees the free count after every allocation, and each
    pass follows the switch as it was at its first sampled layer."""

    mass: torch.Tensor
    passes: int = 0
    queries: int = 0
    seconds: float = 0.0
    watch_free: Optional[int] = None
    collecting: bool = True
    skipped: int = 0
    """Passes the switch left uncollected."""
    switched_on: int = 0
    """Times the switch turned on (pool usage rose past the threshold)."""
    _pass_on: bool = True

    def watch(self, free_slots: int) -> None:
        """The allocator's free slots (a host count) after an allocation."""
        if self.watch_free is None:
            return
        on = free_slots < self.watch_free
        self.switched_on += on and not self.collecting
        self.collecting = on

    def as_dict(self) -> Dict[str, Any]:
        return {"passes": self.passes, "queries": self.queries, "seconds": round(self.seconds, 6),
                "slots_with_mass": int((self.mass > 0).sum()), "collecting": self.collecting,
                "skipped_passes": self.skipped, "switched_on": self.switched_on, "watch_free": self.watch_free}


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


def rksc_hook_strides(forward_hooks: Any) -> List[int]:
    """The ``layer_stride`` of each ``rksc_attention`` entry of ``--forward-hooks`` (a list of
    entries or its JSON text; empty: no such hook)."""
    hooks = forward_hooks
    if isinstance(hooks, str):
        try:
            hooks = json.loads(hooks)
        except json.JSONDecodeError:
            return []
    return [int((h.get("config") or {}).get("layer_stride", 4)) for h in hooks or []
            if isinstance(h, dict) and h.get("hook_factory") == HOOK_FACTORY]


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
        if layer_id == first * stride:  # a pass's first sampled layer decides for the whole pass
            table._pass_on = table.collecting
            table.skipped += not table._pass_on
        if not table._pass_on:
            return None
        sampled = math.ceil((pool.start_layer + pool.layer_num) / stride) - first
        if layer_id == first * stride:  # new KV slots start from 0
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


CHUNK_KEYS = 16384
"""Keys gathered at once (requests x longest of them) by the hook: bounds its scratch memory."""


def request_chunks(lengths: List[int], budget: int = CHUNK_KEYS) -> List[Tuple[int, int, int]]:
    """Consecutive request ranges ``(start, end, longest)`` with ``(end - start) * longest``
    at most ``budget`` (a longer request is a range of its own). Host lengths only."""
    chunks, start, longest = [], 0, 0
    for i, length in enumerate(lengths):
        wider = max(longest, length)
        if i > start and (i + 1 - start) * wider > budget:
            chunks.append((start, i, longest))
            start, wider = i, length
        longest = wider
    if lengths:
        chunks.append((start, len(lengths), longest))
    return chunks


@torch.no_grad()
def _add_query_mass(module, q: torch.Tensor, forward_batch, req_to_token: torch.Tensor, keys: torch.Tensor,
                    mass: torch.Tensor, scale: float) -> int:
    """Add ``scale`` x each counted query's head-mean attention weights to its keys' slots.

    Device operations only: lengths come from ``seq_lens_cpu`` (SGLang's host copy), and
    each chunk of requests is one padded batched product, so nothing waits for the device.
    Returns the queries counted (0 for a pass not counted, or without host lengths)."""
    rows = _query_rows(forward_batch)
    lengths_cpu = getattr(forward_batch, "seq_lens_cpu", None)
    if rows is None or lengths_cpu is None or forward_batch.batch_size == 0:
        return 0
    heads, kv_heads, dim = module.tp_q_head_num, module.tp_k_head_num, module.qk_head_dim
    group = heads // kv_heads
    device = keys.device
    queries = q.reshape(-1, heads, dim)[rows.to(q.device)]
    seq_lens = forward_batch.seq_lens.to(device)
    req_rows = forward_batch.req_pool_indices.to(device)
    lengths = lengths_cpu.tolist()  # a host tensor: no device sync
    for start, end, longest in request_chunks(lengths):
        n = end - start
        positions = torch.arange(longest, device=device)
        slots = req_to_token[req_rows[start:end], :longest].to(torch.int64)  # (n, L); past a length: unused
        valid = positions.unsqueeze(0) < seq_lens[start:end].unsqueeze(1)  # (n, L)
        query = queries[start:end].float().view(n, kv_heads, group, dim)
        block = max(1, CHUNK_KEYS // n)  # keys gathered at once: a long prompt is read in blocks
        scores = torch.cat([torch.einsum("nhgd,nlhd->nhgl", query, keys[slots[:, b:b + block].clamp_min(0)].float())
                            for b in range(0, longest, block)], dim=-1) * module.scaling
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        weights = torch.softmax(scores, dim=-1).mean(dim=(1, 2)) * valid  # (n, L), 0 on padding
        mass.index_add_(0, slots.reshape(-1).to(mass.device), (weights * scale).reshape(-1).to(mass.device))
    return forward_batch.batch_size


# ---- fresh slots start from 0 (also the ones written by passes no hook sees) ---------------------------
ALLOC_TARGETS = (
    "sglang.srt.mem_cache.allocator.token.TokenToKVPoolAllocator.alloc",
    "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.alloc",
    "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.alloc_extend",
    "sglang.srt.mem_cache.allocator.paged.PagedTokenToKVPoolAllocator.alloc_decode",
)


def reset_allocated(result, allocator, *args, **kwargs):
    """AFTER hook of the allocator's ``alloc`` methods: slots handed out start with no mass
    (a device write; nothing is read back), and the table's switch sees the free slots left
    (a host count). With CUDA graphs no forward hook sees replayed passes, so this, not the
    hook, is what keeps a reused slot from carrying the previous owner's mass."""
    table = getattr(allocator.get_kvcache(), _POOL_ATTRIBUTE, None)
    if table is not None:
        if result is not None:
            table.mass[result.to(device=table.mass.device, dtype=torch.int64)] = 0.0
        table.watch(allocator.available_size())
    return result


def watch_usage(table: SlotAttention, watch_free: Optional[int], free_now: int) -> None:
    """Collect only while fewer than ``watch_free`` slots are free (``None``: always),
    starting from the allocator's ``free_now``."""
    table.watch_free, table.collecting = watch_free, True
    table.watch(free_now)


def register_alloc_reset() -> None:
    """Register :func:`reset_allocated` on SGLang's allocators and apply it (once per
    process; the RSBCM cache factory calls it, so other servers' allocators stay untouched)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target in ALLOC_TARGETS:
        if not any(h is reset_allocated for _, h, _ in HookRegistry._hooks.get(target, ())):
            HookRegistry.register(target, reset_allocated, HookType.AFTER)
    HookRegistry.apply_hooks()
