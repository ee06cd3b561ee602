"""Decode-KV compression inside SGLang's runtime, with the radix cache on (``RKSC_COMPRESSION``).

The engine's rule (``rksc_sgl.rksc.compression``), applied to SGLang's scheduler state. A
running request's own decode KV, row positions ``[start, kv_committed_len - buffer)`` where
``start`` is its prompt length (or the exact prefix a retracted request resumed with, which
the tree owns), is scored and cut down to its budget whenever it is over budget plus buffer,
at the same point of the step as on the engine: after the forward that wrote the newest
token's KV, before the next decode step is prepared.

Who does what, in one scheduler process::

    RuntimeCompression   the settings, one int64 offset per req_to_token row (on the
                         pool's device) and the counters; attached to SGLang's
                         ReqToTokenPool, where the scheduler, the model runner and the
                         tree all reach it
    ReqCompression       one compressed request's state (a Req attribute): its dropped
                         count, the original positions of its kept candidates, for
                         ``importance="window"`` the mass each had at the last compression
    the hooks            ``rksc_sgl.runtime.compression_hooks``: positions, compaction,
                         admission (running and new requests reserve the compressed
                         cap, ``reservation``), row release, retraction

A compaction rewrites the request's ``req_to_token`` row (kept candidates, then the rest of
the row moved down), frees the dropped slots to SGLang's allocator at once, lowers
``kv_committed_len`` and ``kv_allocated_len`` by the count dropped, gives the running batch
new ``seq_lens`` / ``seq_lens_cpu`` / ``orig_seq_lens`` tensors (never edited in place: the
overlap scheduler keeps a copy of the batch that shares them), clears ``batch_is_full`` so the
freed slots admit waiting requests in the same pass, and sets the row's offset: decode
positions are ``seq_len - 1 + offset``, the request's true positions.

``cask`` also consolidates before the slots are freed (``cask_select`` decides as the
engine's ``plan``): each kept scratch slot's K and V, on every layer, become the weighted mean
of its own and those merged into it, weights from a per-slot table on the pool's device (the
tokens a slot stands for), set back to 1 when a slot is freed (at the compaction, or with the
request's row).

Device contract: every tensor made here lives on the pool's device; the selection is
``select_keep`` / ``cask_select`` (``topk``, ``sort``), counts are host arithmetic on the
config and SGLang's host lengths, so a compaction reads nothing back from the device.

The tree: a compressed request caches nothing past its prompt (or the exact prefix it held,
``RKSCRadixCache.checkpoint``); its slots are freed exactly once, the dropped ones at the
compaction, the rest when it is released.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Any, Callable, Deque, Dict, List, Optional, TextIO, Tuple

import torch

from rksc_sgl.rksc.compression import cask_select, importance_of, key_similarity, select_keep
from rksc_sgl.rksc.compression_config import CompressionConfig
from rksc_sgl.rksc.tree_cache import REQ_COMPRESSION_ATTR

logger = logging.getLogger(__name__)

__all__ = ["RuntimeCompression", "ReqCompression", "attach", "compression_of"]

POOL_ATTR = "_rksc_compression"
"""The ``ReqToTokenPool`` attribute that holds the process's :class:`RuntimeCompression`."""

HISTORY = 8
"""Released compressed requests whose decisions ``/server_info`` keeps (the newest)."""
EVENTS = 128
"""Compressions of one request kept for ``/server_info`` (the first ones)."""


@dataclasses.dataclass
class ReqCompression:
    """One compressed request's state (``Req.rksc_compression``)."""

    start: int
    """First candidate row position: the prompt's length, or the exact prefix it resumed with."""
    prompt_len: int
    dropped: int = 0
    kept: Optional[torch.Tensor] = None
    """Original positions of the kept candidates, oldest first (int64, the pool's device)."""
    kept_count: int = 0
    seen: Optional[torch.Tensor] = None
    """``importance="window"``: each row position's mass from ``start`` at the last compression."""
    events: List[Tuple[int, torch.Tensor]] = dataclasses.field(default_factory=list)
    """(decoded tokens, kept original positions) of each compression, for ``/server_info``."""
    merged: List[torch.Tensor] = dataclasses.field(default_factory=list)
    """``cask``: each event's (dropped, kept) original positions merged, ``(m, 2)``."""


def compression_of(req_to_token_pool) -> Optional["RuntimeCompression"]:
    """The compression attached to SGLang's ``req_to_token_pool`` (None: off)."""
    return getattr(req_to_token_pool, POOL_ATTR, None)


class RuntimeCompression:
    """Compression of one scheduler process (see the module docstring)."""

    def __init__(self, config: CompressionConfig, req_to_token_pool, allocator, mass: Optional[torch.Tensor],
                 rank_mean: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 decision_log: Optional[TextIO] = None):
        """``rank_mean``: on tensor-parallel ranks, a tensor's mean over the ranks (the same
        bits on each, ``rank_consistency.mean_over_ranks``), applied to the candidates'
        attention mass and key similarities so every rank keeps the same tokens;
        ``decision_log``: a text file that gets one line per compaction (a host read: tests)."""
        self.config = config
        self.rank_mean = rank_mean
        self.decision_log = decision_log
        self.req_to_token_pool = req_to_token_pool
        self.allocator = allocator
        self.pool = allocator.get_kvcache()
        self.mass = mass
        table = req_to_token_pool.req_to_token
        self.device = table.device
        self.offset = torch.zeros(table.shape[0], dtype=torch.int64, device=self.device)
        self.weight: Optional[torch.Tensor] = None
        """``cask``: the tokens each KV slot stands for (1 unless merged into; float32, the
        pool's device), back to 1 when the slot is freed."""
        if config.method == "cask":
            keys = self.pool.get_key_buffer(getattr(self.pool, "start_layer", 0))
            self.weight = torch.ones(keys.shape[0], dtype=torch.float32, device=keys.device)
        self.shifted_rows = 0
        """Rows with a non-zero offset now (host count: no shift at all while it is 0)."""
        self.compactions = 0
        self.dropped_tokens = 0
        self.compressed_requests = 0
        self.history: Deque[Tuple[str, ReqCompression]] = collections.deque(maxlen=HISTORY)

    # ---- which requests ---------------------------------------------------------------------
    @staticmethod
    def eligible(req, chunked_req=None, asks_plans=None) -> bool:
        """A running decode request whose private KV can be compressed: not finished, not
        retracted, not a beam, not the chunked request, not an ASKS recipient (its row holds
        a donor's KV and plan copies)."""
        kv = req.kv
        return (kv.holds_kv and not req.finished() and not getattr(req, "is_retracted", False)
                and getattr(req, "beam_group", None) is None and req is not chunked_req
                and not (asks_plans and id(kv) in asks_plans))

    @staticmethod
    def start_of(req) -> int:
        state = getattr(req, REQ_COMPRESSION_ATTR, None)
        if state is not None:
            return state.start
        return max(len(req.origin_input_ids), req.kv.cache_protected_len)

    @staticmethod
    def admissible(req) -> bool:
        """A waiting request that will be compressed once it decodes: not a beam, not an ASKS
        recipient (its plan is pending from the prefix match until it is admitted)."""
        from rksc_sgl.runtime.asks import PENDING_ATTR

        return getattr(req, "beam_group", None) is None and getattr(req, PENDING_ATTR, None) is None

    def reservation(self, req) -> int:
        """Most slots the request may still take for its decode KV (the engine's
        ``Request.remaining_reservation``): its compressed cap less what it holds. The one
        bound of both admission hooks: a running request's, and a waiting one's (it holds
        nothing yet, ``kv_committed_len`` 0, so it is the whole cap ``private_cap``).

        Exact for the rule as the scheduler runs it: the compaction before every pass leaves
        at most ``target(decoded) + buffer`` decode tokens, the step then adds one, and
        ``target`` never decreases, so no request ever holds more than
        ``target(max_new_tokens) + buffer + 1`` (nor more than it decodes). A retracted
        request that resumes holds its re-prefilled output in its extend, which it is
        charged for; compactions only bring it down from there."""
        held = max(req.kv.kv_committed_len - self.start_of(req), 0)
        return max(self.config.private_cap(req.sampling_params.max_new_tokens) - held, 0)

    # ---- the compaction pass ----------------------------------------------------------------
    def compact_running(self, batch, chunked_req=None, asks_plans=None) -> int:
        """Compress every eligible request of the running ``batch`` that is over budget;
        returns the tokens dropped."""
        reqs = batch.reqs
        lengths = batch.seq_lens_cpu
        if not reqs or lengths is None or lengths.shape[0] != len(reqs):
            return 0
        host = lengths.tolist()  # SGLang's host copy: no device read
        changed: List[Tuple[int, int]] = []
        for i, req in enumerate(reqs):
            if not self.eligible(req, chunked_req, asks_plans):
                continue
            kv = req.kv
            if not host[i] == kv.kv_committed_len == kv.kv_allocated_len:
                continue  # (not a plain decode row: nothing to do safely)
            n = self.compress(req)
            if n:
                changed.append((i, n))
        if changed:
            self._rebind_lengths(batch, changed)
        return sum(n for _, n in changed)

    def compress(self, req) -> int:
        """Compress one request when it is over budget; returns the tokens dropped."""
        cfg, kv = self.config, req.kv
        state: Optional[ReqCompression] = getattr(req, REQ_COMPRESSION_ATTR, None)
        start = self.start_of(req)
        committed = kv.kv_committed_len
        kept = committed - start
        dropped = state.dropped if state is not None else 0
        decoded = kept + dropped
        if not cfg.needs_compression(kept, decoded):
            return 0
        if state is None:
            state = ReqCompression(start=start, prompt_len=len(req.origin_input_ids))
        end = committed - cfg.buffer
        n = end - start
        keep_count = max(0, min(cfg.target(decoded) - cfg.buffer, n))
        if keep_count >= n:
            return 0
        row_index = kv.req_pool_idx
        row = self.req_to_token_pool.req_to_token[row_index]
        slots = row[start:end].to(torch.int64)
        origins = torch.arange(start + state.kept_count, end, dtype=torch.int64, device=self.device) + dropped
        if state.kept is not None:
            origins = torch.cat([state.kept, origins])
        importance = self._importance(state, slots, origins, committed + dropped, n)
        similarity = None
        if cfg.method in ("rkv", "cask"):
            similarity = self._across_ranks(key_similarity(self._keys(slots)))
        merged = None
        if cfg.method == "cask":
            keep, scratch, merge_from, merge_into = cask_select(cfg, importance, None, keep_count,
                                                                similarity=similarity)
            if merge_from.shape[0]:  # (a host size)
                self._merge(slots[scratch], slots[merge_from], torch.searchsorted(scratch, merge_into))
            merged = torch.stack([origins[merge_from], origins[merge_into]], dim=1)
        else:
            keep = select_keep(cfg, importance, None, keep_count, similarity=similarity)
        gone_mask = torch.ones(n, dtype=torch.int32, device=self.device)
        gone_mask[keep] = 0
        gone = slots[torch.sort(gone_mask, stable=True).indices[keep_count:]]  # no host read: counts known
        moved = torch.cat([slots[keep], row[end:committed].to(torch.int64)])
        row[start:start + moved.shape[0]] = moved.to(row.dtype)
        if self.weight is not None:
            self.weight[gone.to(self.weight.device)] = 1.0
        self.allocator.free(gone)
        removed = n - keep_count
        kv.kv_committed_len -= removed
        kv.kv_allocated_len -= removed
        if getattr(req, REQ_COMPRESSION_ATTR, None) is None:
            setattr(req, REQ_COMPRESSION_ATTR, state)
            self.shifted_rows += 1
            self.compressed_requests += 1
        state.dropped += removed
        state.kept, state.kept_count = origins[keep], keep_count
        if cfg.importance == "window":
            now = row[start:kv.kv_committed_len].to(device=self.mass.device, dtype=torch.int64)
            state.seen = self._across_ranks(self.mass[now].float())
        if self.decision_log is not None:
            self.decision_log.write(f"{req.rid} {decoded} {state.kept.tolist()}"
                                    f"{' ' + str(merged.tolist()) if merged is not None else ''}\n")
        if len(state.events) < EVENTS:
            state.events.append((decoded, state.kept))
            if merged is not None:
                state.merged.append(merged)
        self.offset[row_index] = state.dropped
        self.compactions += 1
        self.dropped_tokens += removed
        return removed

    def _importance(self, state: ReqCompression, slots: torch.Tensor, origins: torch.Tensor, now: int,
                    n: int) -> torch.Tensor:
        cfg = self.config
        if not cfg.needs_attention:
            return torch.zeros(n, dtype=torch.float32, device=self.device)
        mass = self._across_ranks(self.mass[slots.to(self.mass.device)].float())
        if cfg.importance == "window":
            seen = torch.zeros(n, dtype=torch.float32, device=mass.device)
            if state.seen is not None:
                k = min(n, state.seen.shape[0])
                seen[:k] = state.seen[:k]
            return importance_of(cfg, mass, seen=seen)
        return importance_of(cfg, mass, age=(now - origins).to(device=mass.device, dtype=torch.float32))

    def _across_ranks(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean over tensor-parallel ranks (each sees only its own heads), or the tensor."""
        return tensor if self.rank_mean is None else self.rank_mean(tensor)

    def _merge(self, scratch: torch.Tensor, src: torch.Tensor, into: torch.Tensor) -> None:
        """``cask``'s consolidation: each kept scratch slot's K and V, on every layer, become the
        mean of its own and those of the slots merged into it (``src[i]`` into
        ``scratch[into[i]]``), weighted by the tokens each stands for; its weight becomes their
        sum and it takes their attention mass."""
        pool, weight = self.pool, self.weight
        scratch, src, into = (t.to(weight.device) for t in (scratch, src, into))
        w_dst, w_src = weight[scratch], weight[src]
        total = w_dst.index_add(0, into, w_src)
        touched = (total != w_dst)[:, None, None]
        first = getattr(pool, "start_layer", 0)
        for layer in range(first, first + pool.layer_num):
            for buf in (pool.get_key_buffer(layer), pool.get_value_buffer(layer)):
                old = buf[scratch]
                mixed = (old.float() * w_dst[:, None, None]).index_add_(0, into, buf[src].float() * w_src[:, None, None])
                buf[scratch] = torch.where(touched, (mixed / total[:, None, None]).to(buf.dtype), old)
        weight[scratch] = total
        if self.mass is not None:
            dst = scratch[into].to(self.mass.device)
            self.mass.index_add_(0, dst, self.mass[src.to(self.mass.device)])

    def _keys(self, slots: torch.Tensor) -> torch.Tensor:
        """The candidates' keys for the redundancy term: ``(n, heads, dim)`` of one layer, or
        of every layer stacked along the head axis (the engine's ``_candidate_keys``)."""
        pool = self.pool
        first = getattr(pool, "start_layer", 0)
        index = slots.to(pool.get_key_buffer(first).device)
        return torch.cat([pool.get_key_buffer(first + layer)[index].float()
                          for layer in self.config.key_layers(pool.layer_num)], dim=1)

    @staticmethod
    def _rebind_lengths(batch, changed: List[Tuple[int, int]]) -> None:
        """New length tensors for the batch (the old ones may be shared by a copy in flight)."""
        names = ["seq_lens", "seq_lens_cpu"] + (["orig_seq_lens"] if batch.orig_seq_lens is not None else [])
        for name in names:
            lengths = getattr(batch, name).clone()
            for i, n in changed:
                lengths[i] -= n
            setattr(batch, name, lengths)
        batch.seq_lens_sum = int(batch.seq_lens_cpu.sum())  # a host tensor
        batch.batch_is_full = False  # the freed slots can admit waiting requests now

    # ---- release ----------------------------------------------------------------------------
    def release(self, req) -> None:
        """The request's row goes back (finished, aborted or retracted): its offset and state go."""
        state = getattr(req, REQ_COMPRESSION_ATTR, None)
        if state is None:
            return
        row = req.kv.req_pool_idx
        if row is not None:
            self.offset[row] = 0
            if self.weight is not None:  # its slots go back to the allocator now (tree or free)
                end = max(req.kv.kv_allocated_len, req.kv.kv_committed_len)
                slots = self.req_to_token_pool.req_to_token[row, state.start:end]
                self.weight[slots.to(device=self.weight.device, dtype=torch.int64)] = 1.0
        self.shifted_rows = max(0, self.shifted_rows - 1)
        self.history.append((str(req.rid), state))
        setattr(req, REQ_COMPRESSION_ATTR, None)

    # ---- /server_info -----------------------------------------------------------------------
    def as_dict(self) -> Dict[str, Any]:
        """Settings, counters and the decisions of the last released compressed requests
        (read back here, off the decode path)."""
        return {
            "settings": dataclasses.asdict(self.config),
            "compactions": self.compactions, "dropped_tokens": self.dropped_tokens,
            "compressed_requests": self.compressed_requests, "running_compressed": self.shifted_rows,
            "decisions": {rid: {"prompt_len": s.prompt_len, "start": s.start, "dropped": s.dropped,
                                "events": [{"decoded": d, "kept": k.tolist(),
                                            **({"merged": s.merged[i].tolist()} if i < len(s.merged) else {})}
                                           for i, (d, k) in enumerate(s.events)]}
                          for rid, s in self.history},
        }


def attach(ctx, cache, config: CompressionConfig) -> RuntimeCompression:
    """Set compression up for the scheduler whose tree SGLang's ``TreeCacheBuildContext``
    ``ctx`` builds: refuse the models it cannot shift, attach the state to the
    ``ReqToTokenPool`` and, for the methods that need it, collect attention on every pass
    (RSBCM's near-full switch off) with allocated slots reset."""
    from rksc_sgl.runtime.compression_settings import compression_unsupported

    allocator = ctx.params.token_to_kv_pool_allocator
    pool = allocator.get_kvcache()
    device = str(getattr(pool, "device", "cpu"))
    problems = compression_unsupported(config, ctx.server_args, {}, device=device)
    if config.method == "cask" and (getattr(pool, "kv_cache_layout", "nhd") != "nhd"
                                    or getattr(pool, "is_quantized_kv_cache", False)):
        problems.append("RKSC_COMPRESSION method 'cask' averages K and V slot by slot: it needs SGLang's plain "
                        "token-major KV pool (layout nhd, not a quantized KV cache)")
    model = ctx.model_config
    for name, what in (("is_multimodal", "multimodal models (mrope positions)"),
                       ("model_is_mrope", "mrope models"), ("is_encoder_decoder", "encoder-decoder models")):
        if getattr(model, name, False):
            problems.append(f"RKSC_COMPRESSION does not support {what}")
    if problems:
        raise ValueError("rksc: " + "; ".join(problems))
    params = ctx.params
    mass = None
    if config.needs_attention:
        from rksc_sgl.runtime.attention_stats import register_alloc_reset, slot_attention_of, watch_usage

        table = slot_attention_of(allocator.get_kvcache())
        watch_usage(table, None, allocator.available_size())  # compression scores every pass
        register_alloc_reset()
        mass = table.mass
    from rksc_sgl.runtime.rank_consistency import rank_log

    rank_mean = _rank_mean(ctx, device) if ctx.tp_size > 1 and config.needs_attention else None
    state = RuntimeCompression(config, params.req_to_token_pool, allocator, mass, rank_mean=rank_mean,
                               decision_log=rank_log(DECISION_LOG_VAR, "compactions", ctx.tp_rank))
    setattr(params.req_to_token_pool, POOL_ATTR, state)
    logger.info("rksc: decode-KV compression on (%s, budget %g, buffer %d, min_tokens %d%s)", config.method,
                config.budget, config.buffer, config.min_tokens,
                f"; {ctx.tp_size} tensor-parallel ranks score with their heads' mean" if rank_mean else "")
    return state


def _rank_mean(ctx, device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The mean over this scheduler's tensor-parallel ranks, on the pool's ``device``: SGLang's
    CPU group (gloo) for a CPU pool, the tensor-parallel device group (NCCL) otherwise."""
    import torch.distributed as dist

    from rksc_sgl.runtime.rank_consistency import mean_over_ranks

    if device.split(":")[0] == "cpu":
        group = ctx.params.tp_cache_group
    else:
        from sglang.srt.distributed import get_tp_group

        group = get_tp_group().device_group
    return mean_over_ranks(group, dist.get_world_size(group=group))


DECISION_LOG_VAR = "RKSC_COMPACTION_LOG"
"""A folder: each scheduler writes one line per compaction (request id, decoded tokens, kept
original positions, ``cask``'s merges) to ``compactions.tp<rank>.pid<pid>.log`` there (checking
that tensor-parallel ranks compress alike). Each line reads the decisions back: for tests."""
