"""Request parsing (SGLang's own ``SamplingParams``), per-request token sampling, and when a request finishes."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Mapping, Optional

import msgspec.structs
import torch

from sglang.srt.sampling.sampling_params import TOP_K_ALL, SamplingParams

from rksc_sgl.engine.grammar import normalize_grammar_fields

if TYPE_CHECKING:
    from rksc_sgl.engine.request import Request


def parse_sampling_params(raw: Mapping[str, Any] | None, tokenizer, vocab_size: int) -> SamplingParams:
    """Build and validate SGLang ``SamplingParams`` from a request dict.

    Unknown fields and out-of-range values raise ``ValueError`` naming the problem,
    with SGLang's own wording for the range checks.
    """
    raw = dict(raw or {})
    n = raw.get("n", 1)
    if n not in (None, 1):
        raise ValueError("n > 1 is expanded by Engine.generate_request; SamplingParams takes n=1")
    for key, value in raw.items():
        _check_type(key, value)
    _check_stop_regex(raw)
    normalize_grammar_fields(raw)
    try:
        params = SamplingParams(**raw)
    except TypeError as e:
        raise ValueError(f"invalid sampling parameters: {e}") from None
    params.verify(vocab_size)
    params.normalize(tokenizer)
    if params.max_new_tokens is None:
        params.max_new_tokens = 128
    return params


_INT_FIELDS = ("max_new_tokens", "min_new_tokens", "top_k", "n", "sampling_seed", "stream_interval")
_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")
_BOOL_FIELDS = ("ignore_eos", "skip_special_tokens", "spaces_between_special_tokens", "no_stop_trim")


def _check_type(key: str, value: Any) -> None:
    """msgspec Structs do not type-check on construction; user input needs it."""
    if value is None:
        return
    if key in _INT_FIELDS:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif key in _FLOAT_FIELDS:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif key in _BOOL_FIELDS:
        ok = isinstance(value, bool)
    elif key in ("stop", "stop_regex"):
        ok = isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value))
    elif key == "stop_token_ids":
        ok = isinstance(value, (list, tuple, set)) and all(isinstance(t, int) for t in value)
    else:
        return
    if not ok:
        raise ValueError(f"sampling parameter {key!r} has the wrong type: {value!r}")


def _check_stop_regex(raw: Dict[str, Any]) -> None:
    """Compile every ``stop_regex`` pattern here, in the caller's thread, so a bad one fails
    the call with a ``ValueError`` naming it (SGLang's ``normalize`` would raise a bare
    ``re.error`` from its length bound). An empty list (the frontend's default ``()``)
    means none."""
    patterns = raw.get("stop_regex")
    if patterns is None:
        return
    if not isinstance(patterns, str) and not patterns:
        raw["stop_regex"] = None
        return
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        try:
            re.compile(pattern)
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"invalid stop_regex {pattern!r}: {e}") from None


def stop_regex_window(params: SamplingParams) -> int:
    """Output tokens SGLang decodes to look for a stop regex (``Req.tail_str``): the
    longest stop string (in tokens) or stop regex match (in characters, at least one per
    token; unbounded patterns give about 2**30, that is, the whole output), plus one."""
    return max(params.stop_str_max_len, params.stop_regex_max_len) + 1


def matched_stop_regex(params: SamplingParams, tail: str) -> Optional[str]:
    """The first of the request's stop regexes found (``re.search``) in ``tail``, or None.
    SGLang's finish reason names the pattern itself: ``{"type": "stop", "matched": pattern}``."""
    for pattern in params.stop_regex_strs:
        if re.search(pattern, tail):
            return pattern
    return None


def is_greedy(params: SamplingParams) -> bool:
    return params.top_k == 1


def sample_token(
    logits: torch.Tensor, params: SamplingParams, output_ids: List[int], generator: torch.Generator
) -> int:
    """Sample one token from ``logits`` (vocab,) the way SGLang's sampler orders the steps:
    penalties, temperature, top-k, top-p, min-p. ``top_k == 1`` is greedy (argmax)."""
    logits = logits.float()
    if params.frequency_penalty or params.presence_penalty or params.repetition_penalty != 1.0:
        logits = _apply_penalties(logits.clone(), params, output_ids)
    if params.logit_bias:
        logits = logits.clone()
        # As SGLang: keys that name one token ("5", "05") keep the last value, not their sum.
        for token_id, bias in {int(k): float(v) for k, v in params.logit_bias.items()}.items():
            logits[token_id] += bias
    if is_greedy(params):
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_k < TOP_K_ALL and params.top_k < probs.numel():
        kept = torch.zeros_like(probs)  # exactly k, as SGLang's sampler: a tie at the k-th is cut
        top = torch.topk(probs, params.top_k).indices
        probs = kept.index_copy_(0, top, probs[top])
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = (cumulative - sorted_probs) > params.top_p
        sorted_probs[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    if params.min_p > 0.0:
        probs = torch.where(probs < params.min_p * probs.max(), torch.zeros_like(probs), probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


def _apply_penalties(logits: torch.Tensor, params: SamplingParams, output_ids: List[int]) -> torch.Tensor:
    if not output_ids:
        return logits
    # SGLang's order: the additive (frequency, presence) penalties, then the scaling (repetition) one.
    ids, counts = torch.unique(torch.tensor(output_ids), return_counts=True)
    logits[ids] -= params.frequency_penalty * counts.float() + params.presence_penalty
    if params.repetition_penalty != 1.0:
        picked = logits[ids]
        logits[ids] = torch.where(picked > 0, picked / params.repetition_penalty, picked * params.repetition_penalty)
    return logits


def top_logprobs(logprobs: torch.Tensor, k: int) -> List[tuple]:
    """(logprob, token_id) pairs of the k most likely tokens, as SGLang reports them."""
    if k <= 0:
        return []
    values, ids = torch.topk(logprobs, k)
    return [(float(v), int(i)) for v, i in zip(values, ids)]


def as_dict(params: SamplingParams) -> Dict[str, Any]:
    return msgspec.structs.asdict(params)


def finish_reason(req: "Request", token: int, text_of: Callable[["Request"], str],
                  tail_text_of: Callable[["Request", int], str]) -> Optional[dict]:
    """Why ``req`` finishes after ``token``, in SGLang's shape, or None: its grammar ended,
    a stop token or string or regex matched (once ``min_new_tokens`` are out), or it
    reached ``max_new_tokens``. ``text_of`` decodes the output as the response shows it,
    ``tail_text_of(req, n)`` its last ``n`` tokens as they are (for stop regexes)."""
    params = req.params
    n = len(req.output_ids)
    if req.grammar is not None and req.grammar.terminated:
        # The grammar accepted EOS and allows nothing more: finish as SGLang does.
        return {"type": "stop", "matched": token}
    if n >= params.min_new_tokens:
        if token in req.stop_ids:
            return {"type": "stop", "matched": token}
        if params.stop_strs:
            text = text_of(req)
            tail = text[-(max(len(s) for s in params.stop_strs) + 32):]
            for stop in params.stop_strs:
                if stop in tail:
                    return {"type": "stop", "matched": stop}
        if params.stop_regex_strs:
            # As SGLang: search the decoded last few tokens (Req.tail_str), name the pattern.
            pattern = matched_stop_regex(params, tail_text_of(req, min(stop_regex_window(params), n)))
            if pattern is not None:
                return {"type": "stop", "matched": pattern}
    if n >= params.max_new_tokens:
        return {"type": "length", "length": params.max_new_tokens}
    return None
