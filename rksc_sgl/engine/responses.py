"""A finished (or growing) scheduler ``Request`` as SGLang's ``/generate`` response.

The text is decoded as SGLang's detokenizer decodes it (stop token dropped, a matched stop
string trimmed); ``meta_info`` has SGLang's keys; a stream yields growing texts and holds
back what a stop string could still cut. :class:`Pending` is the bridge between the
scheduler thread, which reports a request's events, and the caller waiting on them.
"""

from __future__ import annotations

import math
import queue
import time
from typing import Any, Callable, Dict, Iterator, List, Optional

from rksc_sgl.engine.request import Request


class Pending:
    """The caller's side of one submitted request: its events, in order."""

    def __init__(self):
        self.queue: "queue.Queue[tuple]" = queue.Queue()
        self.req: Optional[Request] = None

    def on_event(self, req: Request, finished: bool, error: Optional[BaseException] = None) -> None:
        self.queue.put((finished, error))

    def events(self) -> Iterator[bool]:
        while True:
            finished, error = self.queue.get()
            if error is not None:
                raise error
            yield finished
            if finished:
                return

    def wait(self) -> Request:
        for finished in self.events():
            if finished:
                break
        return self.req


class Responses:
    """Builds response dicts with the engine's tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tail_text(self, req: Request, last_tokens: int) -> str:
        """The last ``last_tokens`` output tokens decoded as they are, as SGLang's
        ``Req.tail_str`` decodes the text it searches stop regexes in (special tokens included)."""
        return self.tokenizer.decode(req.output_ids[-last_tokens:]) if last_tokens > 0 else ""

    def raw_output_text(self, req: Request) -> str:
        """The output decoded (without a final stop token)."""
        ids = req.output_ids
        # A grammar ends on EOS even with ignore_eos; its finish reason names that token.
        matched = (req.finish_reason or {}).get("matched")
        if ids and (ids[-1] in req.stop_ids or (isinstance(matched, int) and matched == ids[-1])):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def output_text(self, req: Request) -> str:
        text = self.raw_output_text(req)
        matched = (req.finish_reason or {}).get("matched")
        if isinstance(matched, str):
            # SGLang's detokenizer (trim_matched_stop): cut at the first occurrence of the
            # matched text, before it or (no_stop_trim) after it. A stop regex's finish
            # reason names the pattern, so its text is cut only where the pattern occurs
            # literally.
            cut = text.find(matched)
            if cut >= 0:
                text = text[: cut + len(matched)] if req.params.no_stop_trim else text[:cut]
        return text

    def response(self, req: Request, return_logprob: bool, with_text: bool) -> Dict[str, Any]:
        return {"text": self.output_text(req), "output_ids": list(req.output_ids),
                "meta_info": self.meta_info(req, return_logprob, with_text)}

    def meta_info(self, req: Request, return_logprob: bool, with_text: bool) -> Dict[str, Any]:
        meta = {
            "id": req.rid,
            "finish_reason": req.finish_reason,
            "prompt_tokens": len(req.input_ids),
            "completion_tokens": len(req.output_ids),
            "cached_tokens": req.cached_tokens,
            "e2e_latency": time.perf_counter() - req.created,
            "output_token_probs_mean": _mean_prob(req.output_logprobs),
        }
        if return_logprob:
            start = req.logprob_start or 0
            meta["input_token_logprobs"] = self._triples(req.input_logprobs, req.input_ids[start:], with_text)
            meta["output_token_logprobs"] = self._triples(req.output_logprobs, req.output_ids, with_text)
            meta["input_top_logprobs"] = [self._top(t, with_text) for t in req.input_top_logprobs]
            meta["output_top_logprobs"] = [self._top(t, with_text) for t in req.output_top_logprobs]
        return meta

    def _triples(self, logprobs, ids, with_text):
        return [(lp, tid, self.tokenizer.decode([tid]) if with_text else None) for lp, tid in zip(logprobs, ids)]

    def _top(self, pairs, with_text):
        return None if pairs is None else self._triples([lp for lp, _ in pairs], [t for _, t in pairs], with_text)

    def stream(self, pending: Pending, return_logprob: bool, with_text: bool,
               on_close: Callable[[Request], None]) -> Iterator[Dict[str, Any]]:
        """Yield responses with the text so far; hold back what could still be cut at the
        end: a stop string, or a stop regex's pattern (the only text a regex cuts, see
        ``output_text``). ``on_close(req)`` runs when the consumer is done, finished or not."""
        req = pending.req
        holdback = max((len(s) for s in (*req.params.stop_strs, *req.params.stop_regex_strs)), default=0)
        try:
            for finished in pending.events():
                if finished:
                    yield self.response(req, return_logprob, with_text)
                    return
                if req.finish_reason is not None:
                    continue  # it finished meanwhile: the final event follows, with the trimmed text
                text = self.raw_output_text(req)
                text = text[: len(text) - holdback] if holdback else text
                yield {"text": text.rstrip("\ufffd"), "output_ids": list(req.output_ids),
                       "meta_info": self.meta_info(req, return_logprob, with_text)}
        finally:
            on_close(req)


def _mean_prob(logprobs: List[float]) -> Optional[float]:
    if not logprobs:
        return None
    return math.fsum(math.exp(lp) for lp in logprobs) / len(logprobs)
