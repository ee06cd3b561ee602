"""Where decode-KV compression enters SGLang's runtime: six plugin hooks (SGLang's
``HookRegistry``), registered by ``rksc_sgl.runtime.plugin.register`` only in processes that
have ``RKSC_COMPRESSION`` set, so a server without it runs SGLang untouched.

======================================================  ======  ==================================
target                                                  type    what
======================================================  ======  ==================================
``Scheduler.get_next_batch_to_run``                     BEFORE  compact the running requests over
                                                                budget (after forward N wrote its
                                                                KV, before step N+1 is prepared
                                                                and before admission)
``ForwardBatch.init_new``                               AFTER   decode positions += the row's
                                                                offset (true positions)
``PrefillAdder._get_running_request_total_token_offset`` AROUND a running request reserves only its
                                                                compressed worst case
``PrefillAdder._select_prefill_admission``              AROUND  a new request is checked and charged
                                                                for its compressed cap, not its
                                                                ``max_new_tokens``
``ReqToTokenPool.free``                                 BEFORE  the row's offset and the request's
                                                                state go with the row
``Req.reset_for_retract``                               AFTER   (the same, for a retracted request)
======================================================  ======  ==================================

Both admission hooks use one bound, ``RuntimeCompression.reservation`` (the compressed cap less
what the request holds), and never reserve more than SGLang would. The new-request hook sits on
``add_one_req``'s choice of a prefill (SGLang's own ``total_tokens`` check and the
``max_new_tokens`` it charges); ASKS's AROUND hook on ``add_one_req`` calls through to it. Two
paths keep SGLang's full reservation: a chunked prefill's last chunk (``add_chunked_req``, for
that one pass; from the next pass on it is a running request) and the ignore-EOS path of a
disabled tree (refused with compression).

Each hook finds the process's :class:`~rksc_sgl.runtime.compression.RuntimeCompression` on
SGLang's ``ReqToTokenPool`` (the tree cache factory attaches it) and does nothing without it.
"""

from __future__ import annotations

import dataclasses

import torch

from rksc_sgl.runtime.compression import compression_of

__all__ = ["register_hooks", "HOOKS"]

SCHEDULE_TARGET = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
POSITIONS_TARGET = "sglang.srt.model_executor.forward_batch_info.ForwardBatch.init_new"
ADMISSION_TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._get_running_request_total_token_offset"
NEW_ADMISSION_TARGET = "sglang.srt.managers.schedule_policy.PrefillAdder._select_prefill_admission"
ROW_FREE_TARGET = "sglang.srt.mem_cache.memory_pool.ReqToTokenPool.free"
RETRACT_TARGET = "sglang.srt.managers.schedule_batch.Req.reset_for_retract"


def compact_before_schedule(scheduler, *args, **kwargs):
    """BEFORE ``Scheduler.get_next_batch_to_run(running_batch, last_batch)``."""
    state = compression_of(scheduler.req_to_token_pool)
    if state is None:
        return None
    batch = kwargs.get("running_batch", args[0] if args else None)
    if batch is not None:
        plans = getattr(scheduler.tree_cache, "plans", None)  # ASKS recipients
        state.compact_running(batch, getattr(scheduler, "chunked_req", None), plans)
    return None


def shift_decode_positions(forward_batch, cls, batch, model_runner=None, *args, **kwargs):
    """AFTER ``ForwardBatch.init_new``: a decode row's position is ``seq_len - 1 + offset``."""
    runner = model_runner if model_runner is not None else kwargs.get("model_runner")
    state = compression_of(getattr(runner, "req_to_token_pool", None))
    if state is None or not state.shifted_rows or forward_batch.positions is None:
        return forward_batch
    if not forward_batch.forward_mode.is_decode() or forward_batch.spec_info is not None:
        return forward_batch
    rows = forward_batch.req_pool_indices.to(device=state.offset.device, dtype=torch.int64)
    forward_batch.positions = forward_batch.positions + state.offset[rows].to(forward_batch.positions.device)
    return forward_batch


def reserve_compressed(original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder._get_running_request_total_token_offset(req)``: a running
    request reserves at most its compressed cap less what it holds (times SGLang's ratio)."""
    value = original(adder, req, *args, **kwargs)
    state = compression_of(getattr(adder.tree_cache, "req_to_token_pool", None))
    if state is None or not state.eligible(req, None, getattr(adder.tree_cache, "plans", None)):
        return value
    ratio = 1.0 if req.sampling_params.ignore_eos else adder.new_token_ratio
    return min(value, state.reservation(req) * ratio)


def admit_compressed(original, adder, req, *args, **kwargs):
    """AROUND ``PrefillAdder._select_prefill_admission(req, *, total_tokens, ...)``: a new request
    that will be compressed needs room for its compressed cap, not for ``max_new_tokens``.

    ``add_one_req`` put SGLang's remaining decode (``_swa_new_tokens``: ``max_new_tokens`` less
    the output so far, clipped) into ``total_tokens``; the hook takes off what that exceeds the
    cap by, then charges the chosen admission at most the cap. Host arithmetic on lengths and
    the config only: every rank decides the same."""
    state = compression_of(getattr(adder.tree_cache, "req_to_token_pool", None))
    if state is None or "total_tokens" not in kwargs or not state.admissible(req):
        return original(adder, req, *args, **kwargs)
    cap = state.reservation(req)
    kwargs["total_tokens"] -= max(adder._swa_new_tokens(req) - cap, 0)
    admission = original(adder, req, *args, **kwargs)
    if getattr(admission, "max_new_tokens", 0) > cap:  # (an AddReqResult has none: refused)
        admission = dataclasses.replace(admission, max_new_tokens=cap)
    return admission


def release_row(pool, req, *args, **kwargs):
    """BEFORE ``ReqToTokenPool.free(req)``: the row's offset and the request's state go."""
    state = compression_of(pool)
    if state is not None:
        state.release(req)
    return None


def reset_after_retract(result, req, *args, **kwargs):
    """AFTER ``Req.reset_for_retract``: the request resumes exact, at its true positions."""
    from rksc_sgl.rksc.tree_cache import REQ_COMPRESSION_ATTR

    if getattr(req, REQ_COMPRESSION_ATTR, None) is not None:
        setattr(req, REQ_COMPRESSION_ATTR, None)
    return result


HOOKS = (
    (SCHEDULE_TARGET, compact_before_schedule, "BEFORE"),
    (POSITIONS_TARGET, shift_decode_positions, "AFTER"),
    (ADMISSION_TARGET, reserve_compressed, "AROUND"),
    (NEW_ADMISSION_TARGET, admit_compressed, "AROUND"),
    (ROW_FREE_TARGET, release_row, "BEFORE"),
    (RETRACT_TARGET, reset_after_retract, "AFTER"),
)


def register_hooks() -> None:
    """Register the hooks with SGLang's plugin ``HookRegistry`` (once per process;
    ``load_plugins`` applies them)."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    for target, hook, kind in HOOKS:
        if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, ())):
            HookRegistry.register(target, hook, HookType[kind])
