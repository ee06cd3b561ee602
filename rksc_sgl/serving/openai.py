"""OpenAI responses: choices, logprobs, usage, and the chunks of a stream."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

if TYPE_CHECKING:
    from rksc_sgl.engine.request_input import GenerateRequest


# ---- OpenAI responses --------------------------------------------------------------------------
def _finish_reason(reason: Optional[Dict[str, Any]]) -> Optional[str]:
    if reason is None:
        return None
    return reason.get("type") if reason.get("type") in ("stop", "length") else str(reason.get("type"))


class Choice:
    """One choice's progress through its engine responses (one final response, or a stream of
    growing ones): the text and the token logprobs not yet sent.

    A token's logprob is sent once its successor exists or the request finished, so a stop
    token (which ends the request) is never sent: OpenAI leaves it out of ``logprobs``.
    """

    def __init__(self, job: "OpenAIJob", index: int, tokenizer):
        self.index = index
        self.prompt_kind, self.prompt = job.prompts[index // job.n]
        self.echo = job.echo
        self.want_logprobs = job.logprobs is not None
        self.top = job.logprobs or 0
        self.tokenizer = tokenizer
        self.text_sent = 0
        self.tokens_sent = 0
        self.started = False
        self.offset = 0  # text_offset of the next token (completions logprobs)
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def echo_text(self) -> str:
        if self.prompt_kind == "text":
            return self.prompt
        return self.tokenizer.decode(self.prompt)

    def advance(self, out: Dict[str, Any]) -> Tuple[str, List[tuple], Optional[str]]:
        """(new text, new token entries (token, logprob, top [(logprob, id, token)] or None,
        text_offset), finish reason once finished) from the engine's latest response."""
        meta = out["meta_info"]
        self.prompt_tokens, self.completion_tokens = meta["prompt_tokens"], meta["completion_tokens"]
        final = meta["finish_reason"] is not None
        text = out["text"]
        delta = text[self.text_sent:]
        self.text_sent = max(self.text_sent, len(text))
        entries: List[tuple] = []
        if not self.started:
            self.started = True
            if self.echo:
                echo = self.echo_text()
                delta = echo + delta
                if self.want_logprobs:
                    offset = 0
                    tops = meta["input_top_logprobs"]
                    for k, (lp, _, token) in enumerate(meta["input_token_logprobs"]):
                        entries.append((token, lp, tops[k] if k < len(tops) else None, offset))
                        offset += len(token)
                self.offset = len(echo)
        if self.want_logprobs:
            logprobs = meta["output_token_logprobs"]
            tops = meta["output_top_logprobs"]
            ready = min(len(logprobs), len(tops)) if self.top else len(logprobs)
            if not final:
                ready -= 1  # the newest token might be a stop token: wait for its successor
            else:
                matched = meta["finish_reason"].get("matched")
                ids = out["output_ids"]
                if isinstance(matched, int) and ids and ids[-1] == matched and ready == len(ids):
                    ready -= 1
            for k in range(self.tokens_sent, ready):
                lp, _, token = logprobs[k]
                entries.append((token, lp, tops[k] if self.top else [], self.offset))
                self.offset += len(token)
            self.tokens_sent = max(self.tokens_sent, ready)
        return delta, entries, (_finish_reason(meta["finish_reason"]) if final else None)


def _completion_logprobs(entries: List[tuple]) -> Dict[str, Any]:
    top_logprobs = []
    for token, lp, top, _ in entries:
        if top is None:
            top_logprobs.append(None)
            continue
        best: Dict[str, float] = {}
        for tlp, _, ttoken in top:
            best[ttoken] = max(tlp, best.get(ttoken, float("-inf")))
        if lp is not None and token not in best:
            best[token] = lp  # the sampled token is always listed, as OpenAI does
        top_logprobs.append(best)
    return {"tokens": [e[0] for e in entries], "token_logprobs": [e[1] for e in entries],
            "top_logprobs": top_logprobs, "text_offset": [e[3] for e in entries]}


def _chat_logprobs(entries: List[tuple]) -> Dict[str, Any]:
    def item(token, lp):
        return {"token": token, "logprob": lp, "bytes": list(token.encode("utf-8", errors="replace"))}

    return {"content": [{**item(token, lp), "top_logprobs": [item(t, tlp) for tlp, _, t in top or ()]}
                        for token, lp, top, _ in entries]}


@dataclasses.dataclass
class OpenAIJob:
    """One OpenAI request, turned into engine requests, and its response shapes."""

    chat: bool
    id: str
    created: int
    model: str
    n: int
    stream: bool
    include_usage: bool
    logprobs: Optional[int]  # top-k per token; None: no logprobs
    echo: bool
    prompts: List[Tuple[str, Any]]
    bodies: List["GenerateRequest"]  # one engine batch, or one request per streamed choice

    def _envelope(self, choices: list, chunk: bool) -> Dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices}

    def _choice(self, state: Choice, text: str, entries: List[tuple], finish: Optional[str],
                chunk: bool) -> Dict[str, Any]:
        index = state.index % self.n if self.chat else state.index
        if self.logprobs is None:
            logprobs = None
        else:
            logprobs = (_chat_logprobs if self.chat else _completion_logprobs)(entries)
        if not self.chat:
            return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        if chunk:
            return {"index": index, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                    "finish_reason": finish}
        return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                "finish_reason": finish}

    def _usage(self, states: List[Choice]) -> Dict[str, int]:
        prompt = sum(s.prompt_tokens for s in states[:: self.n])  # each prompt counts once
        completion = sum(s.completion_tokens for s in states)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def response(self, states: List[Choice], outs: List[Dict[str, Any]]) -> Dict[str, Any]:
        choices = [self._choice(state, *state.advance(out), chunk=False) for state, out in zip(states, outs)]
        return {**self._envelope(choices, chunk=False), "usage": self._usage(states)}

    def _chunk(self, choices: list) -> Dict[str, Any]:
        chunk = self._envelope(choices, chunk=True)
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def head(self, states: List[Choice]) -> List[Dict[str, Any]]:
        if not self.chat:
            return []
        return [self._chunk([{"index": s.index, "delta": {"role": "assistant", "content": ""},
                              "logprobs": None, "finish_reason": None}]) for s in states]

    def render_chunk(self, states: List[Choice]) -> Callable[[int, Dict[str, Any]], List[Dict[str, Any]]]:
        def render(i: int, out: Dict[str, Any]) -> List[Dict[str, Any]]:
            text, entries, finish = states[i].advance(out)
            if not text and not entries and finish is None:
                return []
            return [self._chunk([self._choice(states[i], text, entries, finish, chunk=True)])]
        return render

    def tail(self, states: List[Choice]) -> List[Dict[str, Any]]:
        if not self.include_usage:
            return []
        return [{**self._envelope([], chunk=True), "usage": self._usage(states)}]
