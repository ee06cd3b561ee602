"""ASKS in SGLang's runtime: a recipient's prefill in rounds over a donor's KV.

SGLang computes a prefill as one contiguous cached prefix plus one contiguous extend. An
ASKS recipient's row is not contiguous in that sense: after its exact prefix comes a span
where some positions read a donor's KV and the others must be computed, each attending to
everything before it. This module gets that through SGLang's own chunked prefill, which
already grows a request's prefix between passes, with no change to SGLang:

* ``RuntimeASKSCache.match_prefix`` (the ``rksc`` backend with ``RKSC_ASKS`` set) plans the
  semantic continuation of the exact match (``RKSCRadixCache.match_semantic``, the engine's
  rule) and reports as the prefix the exact part plus the donor positions before the first
  computed one, with ``cache_protected_len`` at the exact part (the tree's).
* An AROUND hook on ``PrefillAdder.add_one_req`` admits the recipient and, when it has more
  than one computed run, makes it SGLang's chunked request, its first chunk ending where
  the first computed run does. Every later round goes through ``PrefillAdder.add_chunked_req``,
  whose AROUND hook first writes the donor slots up to the next computed run into the row
  (the chunk's new prefix) and caps the chunk at that run (``chunked_req_limit``). The last
  round runs to the end of the prompt and samples the first token as any prefill does.
* Computing a run in its own pass over the rows before it gives the same KV as computing
  all runs in one causal pass (the engine's way): a position's KV depends only on the
  positions before it.

Who owns which row position of a recipient (``E`` exact tokens, span, tail)::

    [0, E)              tree (exact prefix)   locked by req.lock    SGLang's cache_protected_len
    span, in place      tree (donor node)     locked by plan.lock   never freed by the request
    span, shifted       the plan (a copy)     copy_slots            freed at on_release
    span, computed      the request           row                   freed by release_kv_cache
    tail and decode     the request           row                   freed by release_kv_cache

``free_kv_row`` leaves the donor and copy positions out of what SGLang frees; ``on_release``
frees the copies and unlocks the donor. The recipient inserts nothing into the tree
(``skip_radix_cache_insert``, which also covers SGLang's checkpoints of unfinished and
chunked requests): its KV past the exact prefix depends on the donor's.

Only fresh text requests are planned (no output yet, no logprobs, no namespace or salt, no
multimodal input or embeddings, no LoRA); others match exactly. Key layer 0 only: keys above
layer 0 would need the recipient's span run through the first layers before its prefix is
matched, a pass SGLang's scheduler has no place for.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Dict, List, Optional

import torch

from rksc_sgl.rksc.asks_config import ASKSConfig
from rksc_sgl.rksc.tree_cache import RKSCRadixCache
from rksc_sgl.runtime.asks_plan import ASKSPlan, key_rotation, subtract_positions
from rksc_sgl.runtime.asks_settings import ENV_VAR, asks_unsupported

logger = logging.getLogger(__name__)

PENDING_ATTR = "rksc_asks_pending"  # the plan of a waiting request's latest match (a Req attribute)
ROUND_OPEN_ATTR = "rksc_asks_round_open"  # a PrefillAdder attribute: a recipient's round is in this batch
ADD_ONE_REQ_TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_one_req"
ADD_CHUNKED_REQ_TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder.add_chunked_req"


# ---- the cache ------------------------------------------------------------------------------------------
class RuntimeASKSCache(RKSCRadixCache):
    """``RKSCRadixCache`` with ASKS for SGLang's scheduler (see the module docstring).

    ``token_features``: token ids -> layer-0 features (the model's token embeddings).
    ``rotate_keys``: ``key_rotation`` of the model's rotary embedding, or ``None`` (shifted
    donor tokens computed). ``kv_dtype``: the pool's dtype name (``ASKSConfig.reuses_shifted``).
    ``wait_for_forward``: makes the current stream wait for the one SGLang's overlap scheduler
    runs forwards on (``None`` on a CPU); shifted copies call it before reading a donor's KV.

    Device contract: donor and copy slots stay on the pool's device; planning reads only
    host data (token ids and a host copy of the token embeddings), so admitting a recipient
    waits for nothing on the device.
    """

    def __init__(self, params, *, asks: ASKSConfig, token_features, rotate_keys=None, kv_dtype: str = "float32",
                 wait_for_forward: Optional[Callable[[], None]] = None):
        super().__init__(params, asks=asks, token_features=token_features)
        self.rotate_keys = rotate_keys if asks.reuses_shifted(kv_dtype) else None
        self.wait_for_forward = wait_for_forward
        self.plans: Dict[int, ASKSPlan] = {}  # id(req.kv) -> the plan of an admitted recipient
        self.recipients = 0  # admitted recipients
        self.planned_rounds = 0  # their prefill passes (one per computed run)

    # -- planning (every admission attempt) --------------------------------------------------------
    def match_prefix(self, params):
        result = super().match_prefix(params)
        req = params.req
        if req is None:
            return result
        plan = self._plan(params.key, result) if self._eligible(req) else None
        setattr(req, PENDING_ATTR, plan)
        if plan is None:
            return result
        return result._replace(device_prefix_len=plan.next_computed(plan.exact_len),
                               cache_protected_len=plan.exact_len)

    def _eligible(self, req) -> bool:
        """Fresh plain text requests that decode. A prefill-only request (the frontend's
        commit before a fork) is computed exactly: it exists to be cached, and a recipient
        caches nothing, so its branches would each miss the prefix and go through ASKS again."""
        if not self.semantic_active or req.output_ids or req.kv.holds_kv or id(req.kv) in self.plans:
            return False
        if req.sampling_params.max_new_tokens == 0:
            return False
        plain = (req.extra_key, req.cache_salt, req.multimodal_inputs, getattr(req, "input_embeds", None),
                 getattr(req, "positional_embed_overrides", None), getattr(req, "lora_id", None))
        return not req.return_logprob and all(value is None for value in plain)

    def _plan(self, key, result) -> Optional[ASKSPlan]:
        exact, limit = result.device_prefix_len, len(key)
        if exact >= limit:
            return None
        span = list(key.raw_token_ids()[exact:limit])
        match = self.match_semantic(span, result.last_device_node, exact, shift=self.rotate_keys is not None,
                                    count=False)
        if match is None or match.reused_tokens == 0:
            return None
        return ASKSPlan.build(match, exact, shift=self.rotate_keys is not None)

    # -- admission and rounds (the PrefillAdder hooks) ---------------------------------------------
    def pending_plan(self, req) -> Optional[ASKSPlan]:
        return getattr(req, PENDING_ATTR, None)

    def admit(self, req) -> ASKSPlan:
        """The recipient was admitted: lock its donor and register its plan."""
        plan = getattr(req, PENDING_ATTR)
        setattr(req, PENDING_ATTR, None)
        plan.lock = self.lock(plan.match.node)
        plan.kv = req.kv
        self.plans[id(req.kv)] = plan
        req.skip_radix_cache_insert = True
        self.count_semantic(plan.match)
        self.recipients += 1
        self.planned_rounds += plan.rounds
        return plan

    def advance(self, req) -> Optional[int]:
        """Before a later round: put the donor slots up to the next computed run into the
        row and make them the chunk's prefix. Returns the run's length (the chunk cap), or
        ``None`` for the last round (or a request without a plan)."""
        plan = self.plans.get(id(req.kv))
        if plan is None:
            return None
        start = req.prefix_len
        target = plan.next_computed(start)
        if target > start:
            slots = self._reused_slots(plan, start, target)
            self.req_to_token_pool.write((req.kv.req_pool_idx, slice(start, target)), slots.to(torch.int32))
            req.prefix_len = target
            req.extend_end = target  # parked here until the chunk is admitted
        end = plan.run_end(target)
        return None if end is None else end - target

    def prefix_device_indices(self, req) -> torch.Tensor:
        plan = self.plans.get(id(req.kv))
        if plan is None:
            return super().prefix_device_indices(req)
        exact = self.path_device_indices(req.last_node)[: plan.exact_len]
        return torch.cat([exact.to(torch.int64), self._reused_slots(plan, plan.exact_len, req.prefix_len)])

    def _reused_slots(self, plan: ASKSPlan, start: int, end: int) -> torch.Tensor:
        """Slots of reused row positions ``start .. end - 1`` (making the copies they need),
        on the pool's device."""
        self._make_copies(plan, [p for p in range(start, end) if p in plan.copies and p not in plan.copy_rows])
        return plan.reused_slots(start, end)

    def _make_copies(self, plan: ASKSPlan, positions: List[int]) -> None:
        """Copy the donor KV of ``positions`` into new slots, keys rotated by each one's delta.

        Device work only. Under SGLang's overlap scheduler the donor's KV may still be being
        written by the forward in flight (a chunk cached before its pass ended): the copy
        waits for the forward stream first (on the device, as SGLang's own barrier does)."""
        if not positions:
            return
        from sglang.srt.mem_cache.allocation import alloc_token_slots

        pool = self.token_to_kv_pool_allocator.get_kvcache()
        if self.wait_for_forward is not None:
            self.wait_for_forward()
        dst = alloc_token_slots(self, len(positions)).to(torch.int64)
        base = 0 if plan.copy_slots is None else len(plan.copy_slots)
        plan.copy_rows.update((position, base + k) for k, position in enumerate(positions))
        plan.copy_slots = dst if plan.copy_slots is None else torch.cat([plan.copy_slots, dst])
        by_delta: Dict[int, List[int]] = {}
        for k, position in enumerate(positions):
            by_delta.setdefault(plan.copies[position][1], []).append(k)
        donor = plan.match.slots
        for delta, ks in by_delta.items():
            offsets = torch.tensor([plan.copies[positions[k]][0] for k in ks], dtype=torch.int64, device=donor.device)
            src = donor[offsets].to(device=pool.device, dtype=torch.int64)
            out = dst[torch.tensor(ks, dtype=torch.int64, device=dst.device)].to(pool.device)
            for layer in range(pool.start_layer, pool.start_layer + pool.layer_num):
                k_buf, v_buf = pool.get_key_buffer(layer), pool.get_value_buffer(layer)
                k_buf[out] = self.rotate_keys(k_buf[src], delta).to(k_buf.dtype)
                v_buf[out] = v_buf[src]

    # -- release -------------------------------------------------------------------------------------
    def free_kv_row(self, kv, ranges):
        plan = self.plans.get(id(kv))
        if plan is not None:
            ranges = subtract_positions(list(ranges), plan.reused)  # the donor's slots, and the plan's copies
        if ranges:
            super().free_kv_row(kv, ranges)

    def on_release(self, req, *, checkpointed: bool) -> None:
        plan = self.plans.pop(id(req.kv), None)
        if plan is not None:
            if plan.copy_slots is not None:
                self.token_to_kv_pool_allocator.free(plan.copy_slots)
            self.unlock(plan.lock)
            plan.lock, plan.kv = None, None
        super().on_release(req, checkpointed=checkpointed)

    def asks_state(self) -> Dict[str, Any]:
        """What ``/server_info`` shows of ASKS: settings and recipients running now."""
        return {"settings": dataclasses.asdict(self.asks), "shifted_reuse": self.rotate_keys is not None,
                "recipients": self.recipients, "prefill_rounds": self.planned_rounds,
                "recipients_running": len(self.plans),
                "donor_tokens_locked": sum(len(p.match.node.key) for p in self.plans.values())}


# ---- the PrefillAdder hooks ----------------------------------------------------------------------------
def around_add_one_req(original, adder, req, *args, **kwargs):
    """Admit an ASKS recipient; with several computed runs it becomes the chunked request,
    its first chunk ending with its first run. While a recipient's round is in the batch,
    nothing else is admitted to it (SGLang tracks one chunked request at a time)."""
    tree = adder.tree_cache
    if not isinstance(tree, RuntimeASKSCache):
        return original(adder, req, *args, **kwargs)
    from sglang.srt.managers.schedule_policy import AddReqResult

    if getattr(adder, ROUND_OPEN_ATTR, False):
        return AddReqResult.OTHER
    plan = tree.pending_plan(req)
    if plan is None:
        return original(adder, req, *args, **kwargs)
    has_chunked_req = kwargs.get("has_chunked_req", args[0] if args else False)
    if plan.rounds > 1 and (has_chunked_req or adder.new_chunked_req is not None):
        return AddReqResult.OTHER  # wait for the chunked request in flight
    result = original(adder, req, *args, **kwargs)
    if not (adder.can_run_list and adder.can_run_list[-1] is req):
        return result
    tree.admit(req)
    first_end = plan.run_end(req.prefix_len)
    if first_end is not None and req.extend_end > first_end:
        req.extend_end = first_end
        adder.new_chunked_req = req
    if adder.new_chunked_req is req:
        setattr(adder, ROUND_OPEN_ATTR, True)
    return result


def around_add_chunked_req(original, adder, req):
    """A recipient's later round: its prefix grows by the donor slots up to its next
    computed run, and the chunk stops where that run does."""
    tree = adder.tree_cache
    if not isinstance(tree, RuntimeASKSCache) or id(req.kv) not in tree.plans:
        return original(adder, req)
    limit = tree.advance(req)
    if limit is None:
        return original(adder, req)  # the last round: the prefill ends and samples as any other
    setattr(adder, ROUND_OPEN_ATTR, True)
    saved = adder.chunked_req_limit
    adder.chunked_req_limit = limit if saved is None else min(saved, limit)
    try:
        return original(adder, req)
    finally:
        adder.chunked_req_limit = saved


def register_hooks() -> None:
    """Register the two AROUND hooks with SGLang's plugin ``HookRegistry`` (once per process)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook in ((ADD_ONE_REQ_TARGET, around_add_one_req), (ADD_CHUNKED_REQ_TARGET, around_add_chunked_req)):
        if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, ())):
            HookRegistry.register(target, hook, HookType.AROUND)


def _forward_barrier(model_runner, device) -> Optional[Callable[[], None]]:
    """The current stream waits (on the device) for the model runner's forward stream, as
    SGLang's scheduler does before it writes what a forward may still read; ``None`` where
    there are no streams (a CPU)."""
    stream = getattr(model_runner, "forward_stream", None)
    if stream is None or torch.device(device).type == "cpu":
        return None
    module = torch.get_device_module(torch.device(device).type)
    return lambda: module.current_stream().wait_stream(stream)


def build_cache(ctx, asks: ASKSConfig) -> RuntimeASKSCache:
    """The ``rksc`` backend with ASKS, from SGLang's ``TreeCacheBuildContext``."""
    args = ctx.server_args
    problems = asks_unsupported(tp_size=ctx.tp_size, page_size=ctx.params.page_size,
                                chunked_prefill_size=args.chunked_prefill_size or 0,
                                speculative_algorithm=getattr(args, "speculative_algorithm", None))
    if getattr(args, "disaggregation_mode", "null") not in ("null", None):
        problems.append(f"ASKS does not support --disaggregation-mode {args.disaggregation_mode}")
    if problems:
        raise ValueError(f"{ENV_VAR} with --radix-cache-backend rksc: " + "; ".join(problems))
    model = ctx.tp_worker.model_runner.model
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or not hasattr(embed, "weight"):
        raise ValueError(f"{ENV_VAR}: cannot find the token embeddings of {type(model).__name__} for ASKS keys")
    # Keys are planned on the host, so the scheduler never waits for the device: a host copy
    # of the token embeddings (vocabulary x hidden, in the model's dtype), made once.
    weight = embed.weight.detach().to("cpu", copy=True)

    @torch.inference_mode()
    def token_features(token_ids) -> torch.Tensor:
        # Layer 0: the token embeddings, the lookup a prefill starts with (no model pass).
        return weight[torch.as_tensor(list(token_ids), dtype=torch.long)].float()

    rotary = next((m for m in model.modules() if hasattr(m, "_compute_inv_freq") and hasattr(m, "rotary_dim")), None)
    rotate = key_rotation(rotary) if rotary is not None else None
    pool = ctx.params.token_to_kv_pool_allocator.get_kvcache()
    dtype = str(getattr(pool, "dtype", weight.dtype)).replace("torch.", "")
    cache = RuntimeASKSCache(ctx.params, asks=asks, token_features=token_features, rotate_keys=rotate, kv_dtype=dtype,
                             wait_for_forward=_forward_barrier(ctx.tp_worker.model_runner, pool.device))
    if asks.reuses_shifted(dtype) and rotate is None:
        logger.info("ASKS: %s cannot be rotated; shifted donor tokens are computed", type(rotary).__name__)
    return cache
