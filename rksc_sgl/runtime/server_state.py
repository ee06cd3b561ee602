"""The ``rksc`` entry of the runtime's ``/server_info``: counters and an idle integrity check.

``/server_info`` returns each scheduler's internal state (``internal_states``, built by
``SchedulerInternalStateController.get_internal_state``). The plugin registers
:func:`add_rksc_state` as an AFTER hook on that method through SGLang's plugin hook
registry, so every scheduler answers, next to its own state::

    "rksc": {"backend": "rksc", "eviction_policy": "rsbcm",
             "cache": {match_calls, exact_hit_tokens, inserted_tokens, evicted_tokens, ...},
             "attention": {passes, queries, seconds, slots_with_mass} | null,
             "compression": {settings, compactions, dropped_tokens, decisions, ...} | null,
             "integrity": {"checked": bool, "ok": bool, "problems": [...], "slots": {...}}}

The integrity check runs only when the scheduler is idle (no running, waiting or chunked
request): then every KV slot must be either free in the allocator or held by exactly one
tree node, and no tree node may keep a lock. SGLang's own idle memory check (strict by
default in 0.5.23) checks the totals; this one also checks slot identity and locks.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List

import torch

from rksc_sgl.runtime.attention_stats import slot_attention_of

logger = logging.getLogger(__name__)

INTERNAL_STATE_TARGET = (
    "sglang.srt.managers.scheduler_components.internal_state.SchedulerInternalStateController.get_internal_state"
)


def add_rksc_state(result, controller, *args, **kwargs):
    """AFTER hook of ``get_internal_state``: add the ``rksc`` entry when the tree is RKSC's.

    The cache classes are imported here, when a scheduler answers ``/server_info``, not when
    the plugin registers the hook: that happens in every SGLang process.
    """
    from rksc_sgl.rksc.tree_cache import RKSCRadixCache
    from rksc_sgl.runtime.asks import RuntimeASKSCache

    scheduler = controller.scheduler
    tree = getattr(scheduler, "tree_cache", None)
    if not isinstance(tree, RKSCRadixCache):
        return result
    asks_tree = tree if isinstance(tree, RuntimeASKSCache) else None
    try:
        result.internal_state["rksc"] = rksc_state(scheduler, tree, asks_tree)
    except Exception as exc:  # never break /server_info
        logger.exception("rksc state failed")
        result.internal_state["rksc"] = {"error": repr(exc)}
    return result


def rksc_state(scheduler, tree, asks_tree=None) -> Dict[str, Any]:
    """The ``rksc`` entry of an RKSC tree; ``asks_tree`` is the same tree when it is a
    ``RuntimeASKSCache`` (ASKS on), else None."""
    pool = tree.token_to_kv_pool_allocator.get_kvcache()
    return {
        "backend": "rksc",
        "eviction_policy": tree.eviction_policy,
        "cache": tree.stats.as_dict(),
        "attention": slot_attention_of(pool).as_dict() if tree.slot_attention is not None else None,
        "asks": asks_tree.asks_state() if asks_tree is not None else None,
        "compression": _compression_state(tree),
        "integrity": integrity(scheduler, tree, asks_tree),
    }


def _compression_state(tree):
    """Decode-KV compression's settings, counters and recent decisions (None: off)."""
    from rksc_sgl.runtime.compression import compression_of

    state = compression_of(tree.req_to_token_pool)
    return state.as_dict() if state is not None else None


def _idle(scheduler) -> bool:
    running = scheduler.running_batch
    return (len(scheduler.waiting_queue) == 0 and (running is None or running.is_empty())
            and getattr(scheduler, "chunked_req", None) is None)


def integrity(scheduler, tree, asks_tree=None) -> Dict[str, Any]:
    """Slot and lock invariants of an idle scheduler's tree (``checked: false`` when busy)."""
    if not _idle(scheduler):
        return {"checked": False, "ok": None, "problems": []}
    allocator = tree.token_to_kv_pool_allocator
    problems: List[str] = []
    held: List[torch.Tensor] = []
    locked = 0
    stack = list(tree.root_node.children.values())
    while stack:
        node = stack.pop()
        if node.lock_ref:
            locked += 1
        if node.value is not None:
            held.append(node.value.to(torch.int64).cpu())
        stack.extend(node.children.values())
    tree_slots = torch.cat(held) if held else torch.empty(0, dtype=torch.int64)
    free_pages = allocator.get_all_free_pages() if allocator.page_size == 1 else None
    free = free_pages.to(torch.int64).cpu() if free_pages is not None else None
    total = scheduler.max_total_num_tokens
    if locked:
        problems.append(f"{locked} tree nodes still locked while idle")
    plans = asks_tree.plans if asks_tree is not None else None
    if plans:
        problems.append(f"{len(plans)} ASKS recipients still registered while idle")
    if tree.protected_size():
        problems.append(f"protected_size is {tree.protected_size()} while idle")
    if tree_slots.numel() != torch.unique(tree_slots).numel():
        problems.append("a KV slot is held by two tree nodes")
    if tree_slots.numel() != tree.evictable_size():
        problems.append(f"tree nodes hold {tree_slots.numel()} slots, evictable_size says {tree.evictable_size()}")
    slots = {"total": total, "free": allocator.available_size(), "tree": int(tree_slots.numel())}
    if free is not None:
        both = torch.isin(tree_slots, free).sum().item()
        if both:
            problems.append(f"{both} slots are both free and in the tree")
    if slots["free"] + slots["tree"] != total:
        problems.append(f"free {slots['free']} + tree {slots['tree']} != total {total}: slots lost")
    return {"checked": True, "ok": not problems, "problems": problems, "slots": slots}
