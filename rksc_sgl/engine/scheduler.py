"""The scheduler: one thread that owns the model and the KV cache.

Requests arrive from any thread (the SGLang interpreter runs each forked branch in its
own thread); the loop admits as many as memory allows into one prefill step, then runs
one batched decode step over everything running, and repeats. Admission reserves each
request's worst case (new prompt tokens + ``max_new_tokens``) against free plus
evictable slots, so a running request never runs out of KV mid-decode; a request that
does not fit waits (FIFO, so nothing starves), and one that can never fit fails at once
with a clear error. Whatever happens to a request, its slots, row and tree lock are
released exactly once (``_finish``).
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time
from typing import Callable, Deque, List, Optional

import torch

from rksc_sgl.rksc.compression import compress_decode_kv
from rksc_sgl.kv.manager import KVCacheExhausted, KVCacheManager
from rksc_sgl.model.runner import ForwardItem, ModelRunner
from rksc_sgl.engine.request import EngineStats, Request
from rksc_sgl.engine.sampling import finish_reason, sample_token, top_logprobs

logger = logging.getLogger(__name__)


class Scheduler:
    """Continuous batching over one ``ModelRunner`` and one ``KVCacheManager``."""

    def __init__(
        self,
        runner: ModelRunner,
        kv: KVCacheManager,
        max_running: int,
        max_prefill_tokens: int,
        in_batch_prefix_min_tokens: int,
        queue_timeout_s: float,
        seed: int,
        text_of: Callable[[Request], str],
        tail_text_of: Callable[[Request, int], str],
        num_threads: Optional[int] = None,
        span_features: Optional[Callable] = None,
    ):
        self.runner = runner
        self.kv = kv
        self.max_running = max_running
        self.max_prefill_tokens = max_prefill_tokens
        self.in_batch_prefix_min_tokens = in_batch_prefix_min_tokens
        self.queue_timeout_s = queue_timeout_s
        self.text_of = text_of  # the output so far, as the response will show it
        self.tail_text_of = tail_text_of  # the last n output tokens decoded as they are (stop regexes)
        self.num_threads = num_threads
        self.span_features = span_features  # ASKS above layer 0: keys a recipient's span (SpanKeys)
        self.generator = torch.Generator().manual_seed(seed)
        self.stats = EngineStats()
        self.incoming: "queue.Queue[Optional[Request]]" = queue.Queue()
        self.waiting: Deque[Request] = collections.deque()
        self.running: List[Request] = []
        self._idle = threading.Event()
        self._idle.set()
        self._calls: "queue.Queue[tuple]" = queue.Queue()
        self._stopped = False
        self.thread = threading.Thread(target=self._loop, name="rksc-scheduler", daemon=True)
        self.thread.start()

    # ---- called from other threads -------------------------------------------------
    def submit(self, req: Request) -> None:
        if self._stopped:
            raise RuntimeError("the engine has been shut down")
        self._idle.clear()
        self.incoming.put(req)

    def cancel(self, req: Request, message: str = "cancelled", cache_output: bool = True) -> None:
        """Ask the scheduler to drop a request (client went away, branch stopped); frees its KV.

        ``cache_output=False``: nothing it decoded goes into the tree, only its prompt (a
        stopped branch's partial answer is not left for later lookups)."""
        req.cancel_message, req.cancel_caches_output = message, cache_output
        req.cancelled = True
        self.incoming.put(None)  # wake the loop

    def call(self, fn: Callable, timeout: float = 60.0):
        """Run ``fn()`` on the scheduler thread between steps and return its result."""
        done: "queue.Queue[tuple]" = queue.Queue()
        self._calls.put((fn, done))
        self.incoming.put(None)
        ok, value = done.get(timeout=timeout)
        if not ok:
            raise value
        return value

    def wait_idle(self, timeout: Optional[float] = None) -> bool:
        return self._idle.wait(timeout)

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.incoming.put(None)
        self.thread.join(timeout=30)

    # ---- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        if self.num_threads:
            torch.set_num_threads(self.num_threads)
        while True:
            self._pull(block=not self.waiting and not self.running)
            if self._stopped:
                self._fail_all(RuntimeError("the engine was shut down"))
                return
            self._run_calls()
            self._drop_cancelled()
            started = time.perf_counter()
            had_work = bool(self.waiting or self.running)
            try:
                if self.waiting:
                    self._admit_and_prefill()
                if self.running:
                    self._decode_step()
            except Exception as exc:  # a bug or a model failure: fail the batch, keep serving
                logger.exception("scheduler step failed")
                for req in list(self.running):
                    self._finish(req, error=exc)
            if had_work:
                self.stats.busy_time_s += time.perf_counter() - started
            if not self.waiting and not self.running and self.incoming.empty():
                self._idle.set()

    def _pull(self, block: bool) -> None:
        try:
            item = self.incoming.get(timeout=0.5) if block else self.incoming.get_nowait()
        except queue.Empty:
            return
        while True:
            if item is not None:
                self.waiting.append(item)
            try:
                item = self.incoming.get_nowait()
            except queue.Empty:
                return

    def _run_calls(self) -> None:
        while True:
            try:
                fn, done = self._calls.get_nowait()
            except queue.Empty:
                return
            try:
                done.put((True, fn()))
            except Exception as exc:
                done.put((False, exc))

    def _drop_cancelled(self) -> None:
        for req in [r for r in self.waiting if r.cancelled]:
            self.waiting.remove(req)
            self._finish(req, abort=req.cancel_message)
        for req in [r for r in self.running if r.cancelled]:
            self._finish(req, abort=req.cancel_message)

    # ---- admission + prefill ----------------------------------------------------------
    def _admit_and_prefill(self) -> None:
        batch = self._admit()
        if not batch:
            return
        # Running from here on, so a failing forward releases them like any other.
        self.running.extend(batch)
        items = [self._prefill_item(req) for req in batch]
        logits = self.runner.forward(items)
        self.stats.forward_passes += 1
        for req, item, req_logits in zip(batch, items, logits):
            # All the prompt is in the row now (with an alias, not all of it was computed).
            self.kv.commit(req.kv, req.input_ids[req.kv.kv_len :])
            self.stats.prefill_tokens += len(item.token_ids)
            self._record_input_logprobs(req, req_logits)
            if req.max_new_tokens == 0:
                self._finish(req, reason={"type": "length", "length": 0})
                continue
            self.kv.checkpoint(req.kv)
            self._append_token(req, req_logits[-1])
        self.note_peak()

    def _admit(self) -> List[Request]:
        """Pick waiting requests that fit, lock their cached prefixes, FIFO."""
        now = time.perf_counter()
        for req in [r for r in self.waiting if now - r.created > self.queue_timeout_s]:
            self.waiting.remove(req)
            self._finish(req, error=KVCacheExhausted(
                f"request waited {self.queue_timeout_s:.0f}s for KV memory; raise kv_pool_tokens"))
        reserved = sum(r.remaining_reservation() for r in self.running)
        batch: List[Request] = []
        prefill_tokens = 0
        deferred: List[Request] = []
        try:
            while self.waiting and len(self.running) + len(batch) < self.max_running:
                req = self.waiting[0]
                try:
                    step = self._admit_one(req, batch, deferred, reserved, prefill_tokens)
                except Exception as exc:  # fail this request only; the others keep their turn
                    logger.exception("admitting a request failed")
                    if req.kv is not None:
                        self.kv.cancel_open(req.kv)
                        req.kv = None
                    if self.waiting and self.waiting[0] is req:
                        self.waiting.popleft()
                    self._finish(req, error=exc)
                    continue
                if step is None:
                    break
                reserved, prefill_tokens = step
        finally:
            self.waiting.extendleft(reversed(deferred))
        return batch

    def _admit_one(self, req: Request, batch: List[Request], deferred: List[Request], reserved: int,
                   prefill_tokens: int) -> Optional[tuple]:
        """Admit the head of the queue into ``batch`` if it fits: the new (reserved,
        prefill tokens), or None when it must wait for memory or the next step."""
        cap = len(req.input_ids) - 1
        if req.logprob_start is not None:
            # Logits from the logprob start onwards are needed: compute it again.
            cap = min(cap, req.logprob_start)
        if self._shares_prefix_with(req, batch):
            # Another request of this batch computes the same prefix; take this one
            # next step, when it can reuse that prefix from the tree.
            deferred.append(self.waiting.popleft())
            return reserved, prefill_tokens
        prefix, node = self.kv.match(req.input_ids, cap, req.namespace)
        need = len(req.input_ids) - len(prefix) + req.decode_kv_cap
        if need + len(prefix) > self.kv.pool_tokens:
            self.waiting.popleft()
            decode = (f"{req.max_new_tokens} max_new_tokens" if req.compression is None
                      else f"{req.decode_kv_cap} compressed decode tokens")
            self._finish(req, error=KVCacheExhausted(
                f"request needs {len(req.input_ids) + req.decode_kv_cap} KV slots "
                f"({len(req.input_ids)} prompt + {decode}) "
                f"but the KV pool holds {self.kv.pool_tokens}; raise kv_pool_tokens "
                "or lower max_new_tokens"))
            return reserved, prefill_tokens
        alias = None
        # Scored prompts are computed exactly, and so is a prefill-only request (a fork's
        # commit, cache_prefix): it exists to be cached, and a recipient caches nothing, so
        # its branches would each miss the prefix and go through ASKS again.
        if req.logprob_start is None and req.namespace is None and req.max_new_tokens > 0:
            alias = self.kv.match_alias(req.input_ids, cap, prefix, node, span_features=self.span_features)
            self.stats.key_tokens = self.kv.key_tokens
        reused = alias.reused_tokens if alias is not None else 0
        need -= alias.shared_tokens if alias is not None else 0  # (shifted copies take new slots)
        req.kv = self.kv.open(req.input_ids, prefix, node, alias, namespace=req.namespace)
        extend = len(req.input_ids) - len(prefix) - reused
        over_budget = self.kv.available_tokens() - reserved < need
        over_prefill = batch and prefill_tokens + extend > self.max_prefill_tokens
        if over_budget or over_prefill:
            self.kv.cancel_open(req.kv)
            req.kv = None
            return None
        self.waiting.popleft()
        req.cached_tokens = len(prefix)
        self.stats.cached_tokens += len(prefix)
        if alias is not None:
            req.semantic_tokens = reused
            self.stats.semantic_tokens += reused
            self.stats.recomputed_tokens += len(alias.recompute)
        self.stats.requests += 1
        reserved += need
        prefill_tokens += extend
        batch.append(req)
        return reserved, prefill_tokens

    def _shares_prefix_with(self, req: Request, batch: List[Request]) -> bool:
        if self.kv.tree.disable or not self.in_batch_prefix_min_tokens:
            return False
        for other in batch:
            if other.namespace != req.namespace:
                continue
            common = len(os.path.commonprefix([req.input_ids, other.input_ids]))
            if common - other.cached_tokens >= self.in_batch_prefix_min_tokens:
                return True
        return False

    def _prefill_item(self, req: Request) -> ForwardItem:
        start = req.kv.kv_len
        new_ids = req.input_ids[start:]
        self.kv.extend(req.kv, new_ids)
        alias = req.kv.alias
        if alias is not None:
            # Donor KV fills the span; compute the recomputed positions and the rest.
            computed = alias.positions
            return ForwardItem([req.input_ids[p] for p in computed], computed[0],
                               self.kv.row_slots(req.kv, start + len(new_ids)), token_positions=computed)
        positions = None
        if req.logprob_start is not None:
            positions = list(range(req.logprob_start - start, len(new_ids)))
        return ForwardItem(new_ids, start, self.kv.row_slots(req.kv, start + len(new_ids)), positions)

    def _record_input_logprobs(self, req: Request, logits: torch.Tensor) -> None:
        """SGLang's layout: one entry per prompt token from ``logprob_start``; the first
        is None (nothing before it was scored), entry k is log p(token | tokens before)."""
        if req.logprob_start is None:
            return
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        req.input_logprobs.append(None)
        req.input_top_logprobs.append(None)
        # Row j of ``logits`` (position logprob_start + j) predicts the token after it;
        # the last row predicts the first output token and is not a prompt logprob.
        for j, pos in enumerate(range(req.logprob_start + 1, len(req.input_ids))):
            req.input_logprobs.append(float(logprobs[j, req.input_ids[pos]]))
            req.input_top_logprobs.append(top_logprobs(logprobs[j], req.top_logprobs_num))

    # ---- decode -----------------------------------------------------------------------
    def _decode_step(self) -> None:
        batch = [r for r in self.running if r.output_ids]
        items = []
        for req in batch:
            token = req.output_ids[-1]
            start = req.kv.kv_len
            self.kv.extend(req.kv, [token])
            items.append(ForwardItem([token], start, self.kv.row_slots(req.kv, start + 1), rope_offset=req.kv.dropped))
        self.note_peak()
        logits = self.runner.forward(items)
        self.stats.forward_passes += 1
        for req, item, req_logits in zip(batch, items, logits):
            self.kv.commit(req.kv, item.token_ids)
            self.stats.decode_tokens += 1
            if req.compression is not None:  # over its budget: drop or merge decode KV (rksc/compression.py)
                self.stats.dropped_tokens += compress_decode_kv(self.kv, req.kv, len(req.input_ids), req.compression)
            self._append_token(req, req_logits[-1])

    def _append_token(self, req: Request, logits: torch.Tensor) -> None:
        if req.grammar is not None:
            # As SGLang: the grammar's vocab mask applies before logprobs and sampling.
            logits = req.grammar.mask(logits)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        if len(req.output_ids) < req.params.min_new_tokens and req.stop_ids:
            # As SGLang's min-new-tokens penalizer: stop tokens cannot be sampled yet
            # (unless the grammar allows nothing else: then the grammar wins).
            masked = logits.clone()
            masked[list(req.stop_ids)] = float("-inf")
            if req.grammar is None or bool(torch.isfinite(masked).any()):
                logits = masked
        if req.observe is not None:
            req.observe(req, logprobs)
        if req.forced_ids is not None:
            token = req.forced_ids[len(req.output_ids)]
        else:
            token = sample_token(logits, req.params, req.output_ids,
                                 self.generator if req.generator is None else req.generator)
        if req.grammar is not None and not req.grammar.accept(token):
            self._finish(req, error=RuntimeError(f"the grammar rejected sampled token {token}"))
            return
        req.output_ids.append(token)
        req.output_logprobs.append(float(logprobs[token]))
        if req.want_logprobs and req.top_logprobs_num:
            req.output_top_logprobs.append(top_logprobs(logprobs, req.top_logprobs_num))
        reason = finish_reason(req, token, self.text_of, self.tail_text_of)
        if reason is not None:
            self._finish(req, reason=reason)
        elif req.on_event is not None:
            req.on_event(req, False)

    # ---- completion -----------------------------------------------------------------
    def _finish(self, req: Request, reason: Optional[dict] = None, error: Optional[BaseException] = None,
                abort: Optional[str] = None) -> None:
        """Release everything the request holds (exactly once) and tell its waiter."""
        if req in self.running:
            self.running.remove(req)
        if req.kv is not None:
            if error is not None or abort is not None:
                keep = req.kv.kv_len if req.cancel_caches_output else min(req.kv.kv_len, len(req.input_ids))
                self.kv.release_uncached(req.kv, keep_len=keep if error is None else req.kv.protected_len)
            else:
                self.kv.release(req.kv)
            req.kv = None
        if abort is not None:
            reason = {"type": "abort", "message": abort}
        req.finish_reason = reason
        if req.on_event is not None:
            try:
                req.on_event(req, True, error)
            except Exception:
                logger.exception("request callback failed")

    def _fail_all(self, error: BaseException) -> None:
        for req in list(self.running) + list(self.waiting):
            self._finish(req, error=error)
        self.waiting.clear()
        while True:
            try:
                req = self.incoming.get_nowait()
            except queue.Empty:
                break
            if req is not None:
                self._finish(req, error=error)
        self._idle.set()

    def note_peak(self) -> None:
        working_set = self.kv.used_tokens() - self.kv.tree.evictable_size()
        self.stats.peak_kv_tokens = max(self.stats.peak_kv_tokens, working_set)
