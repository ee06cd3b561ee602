"""One generation request, typed and checked in one place (as SGLang's ``GenerateReqInput``).

Every way into the engine builds a :class:`GenerateRequest` and hands it to ``Engine.handle``:

=========================================  ==================================================
caller                                     builds it from
=========================================  ==================================================
``Engine.generate_request(**fields)``      keyword fields (SGLang's ``/generate`` names)
the frontend backend (``gen``, ``select``,  the ``StreamExecutor`` (``FrontendBackend``)
commits, fork joins)
HTTP ``POST /generate``                    the JSON body (:meth:`GenerateRequest.from_body`)
OpenAI ``/v1/completions``, ``/v1/chat``   OpenAI's fields mapped onto these
=========================================  ==================================================

What is checked here needs no model: the type of every field, and how prompts, per-prompt
sampling parameters, ``n`` and ``extra_key`` pair up. The engine then checks what needs the
tokenizer and the model (token ids in the vocabulary, the context length, the sampling
values, grammars) before any prompt of the request starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

GENERATE_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "stream", "extra_key",
})
ANY_VALUE = object()  # a tolerated field accepted (and ignored) whatever its value
# Fields SGLang clients may send with a neutral value; accepted only when they are neutral.
NEUTRAL_GENERATE_FIELDS = {"image_data": (None, [], ""), "rid": (None,), "lora_path": (None,),
                           "return_hidden_states": (None, False), "log_metrics": (None, True)}
_BOOL_FIELDS = ("return_logprob", "return_text_in_logprobs", "stream")
_INT_FIELDS = ("logprob_start_len", "top_logprobs_num")


class RequestError(ValueError):
    """A request field is malformed (the HTTP server answers 400 with this message)."""


def check_fields(body: Dict[str, Any], allowed: Iterable[str], neutral: Dict[str, Any],
                 where: str = "request") -> None:
    """Reject unknown fields of ``body``, naming them; drop the tolerated ones (``neutral``:
    field -> ``ANY_VALUE`` or the values it is accepted with)."""
    unknown = []
    for key in list(body):
        if key in allowed:
            continue
        if key in neutral and (neutral[key] is ANY_VALUE or body[key] in neutral[key]):
            del body[key]
            continue
        unknown.append(key)
    if unknown:
        raise RequestError(f"unknown or unsupported {where} fields: {sorted(unknown)}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class PromptInput:
    """One prompt of a request after ``n`` expansion: what one scheduler ``Request`` runs."""

    text: Optional[str]
    input_ids: Optional[List[int]]
    sampling_params: Dict[str, Any]
    namespace: Optional[str]  # the tree namespace (``extra_key``)


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    """SGLang's ``/generate`` request. ``text`` or ``input_ids`` is one prompt or a batch (a
    list); ``sampling_params`` one dict for all prompts or one per prompt of a batch;
    ``extra_key`` one namespace for all or one per prompt; ``stream_id`` the frontend stream
    the (single) prompt belongs to, so a vote can stop it."""

    text: Union[str, Sequence[str], None] = None
    input_ids: Union[Sequence[int], Sequence[Sequence[int]], None] = None
    sampling_params: Union[Dict[str, Any], Sequence[Optional[Dict[str, Any]]], None] = None
    return_logprob: bool = False
    logprob_start_len: int = -1
    top_logprobs_num: int = 0
    return_text_in_logprobs: bool = False
    stream: bool = False
    extra_key: Union[str, Sequence[Optional[str]], None] = None
    stream_id: Optional[str] = None

    @classmethod
    def from_body(cls, body: Any) -> "GenerateRequest":
        """A native ``/generate`` JSON body: unknown fields are refused by name, ``null``
        means not given."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        body = dict(body)
        check_fields(body, GENERATE_FIELDS, NEUTRAL_GENERATE_FIELDS)
        return cls(**{k: v for k, v in body.items() if v is not None})

    def __post_init__(self):
        for name, default in (("return_logprob", False), ("return_text_in_logprobs", False), ("stream", False),
                              ("logprob_start_len", -1), ("top_logprobs_num", 0)):
            value = getattr(self, name)
            if value is None:
                object.__setattr__(self, name, default)
            elif name in _BOOL_FIELDS and not isinstance(value, bool):
                raise RequestError(f"{name!r} must be a boolean")
            elif name in _INT_FIELDS and not is_int(value):
                raise RequestError(f"{name!r} must be an integer")
        if self.top_logprobs_num < 0:
            raise RequestError("top_logprobs_num must be >= 0")
        self._check_prompts()
        self._check_sampling_params()
        self._check_extra_key()
        if self.stream and self.is_batch:
            raise RequestError("streaming is supported for a single prompt and n=1 only")
        if self.stream_id is not None and self.is_batch:
            raise RequestError("a stream_id request has exactly one prompt")

    def _check_prompts(self) -> None:
        text, ids = self.text, self.input_ids
        if (text is None) == (ids is None):
            raise RequestError("give exactly one of text or input_ids")
        if text is not None and not (isinstance(text, str) or (
                isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text))):
            raise RequestError("'text' must be a string or a non-empty list of strings")
        if ids is not None and not (isinstance(ids, (list, tuple)) and ids and (
                all(is_int(t) for t in ids)
                or all(isinstance(row, (list, tuple)) and all(is_int(t) for t in row) for row in ids))):
            raise RequestError("'input_ids' must be a non-empty list of ints or of lists of ints")

    def _check_sampling_params(self) -> None:
        params = self.sampling_params
        entries = list(params) if isinstance(params, (list, tuple)) else [params]
        if not all(p is None or isinstance(p, dict) for p in entries):
            raise RequestError("'sampling_params' must be a JSON object or a list of them")
        if isinstance(params, (list, tuple)) and (not self.is_batch_input or len(entries) != self.prompt_count):
            raise RequestError(f"a list of sampling_params needs one entry per prompt of a batch "
                               f"({self.prompt_count} prompts, {len(entries)} entries)")
        values = {(p or {}).get("n", 1) for p in entries}
        values = {1 if v is None else v for v in values}
        if len(values) != 1:
            raise RequestError("n must be the same for every prompt of a batch")
        n = values.pop()
        if not is_int(n) or n < 1:
            raise RequestError(f"n must be a positive integer, got {n!r}")

    def _check_extra_key(self) -> None:
        key = self.extra_key
        if key is None or isinstance(key, str):
            return
        keys = list(key) if isinstance(key, (list, tuple)) else None
        if (keys is None or not self.is_batch_input or len(keys) != self.prompt_count
                or not all(k is None or isinstance(k, str) for k in keys)):
            raise RequestError(f"extra_key must be a string, or a list of {self.prompt_count} strings "
                               f"for a batch of {self.prompt_count} prompts")

    # ---- what the request asks for ---------------------------------------------------------
    @property
    def is_batch_input(self) -> bool:
        """Whether the prompts came as a list (the response is then a list)."""
        if self.text is not None:
            return not isinstance(self.text, str)
        return isinstance(self.input_ids[0], (list, tuple))

    @property
    def prompt_count(self) -> int:
        if self.text is not None:
            return 1 if isinstance(self.text, str) else len(self.text)
        return len(self.input_ids) if self.is_batch_input else 1

    @property
    def n(self) -> int:
        """Samples per prompt (the same for every prompt, checked)."""
        params = self.sampling_params
        first = params[0] if isinstance(params, (list, tuple)) else params
        return (first or {}).get("n", 1) or 1

    @property
    def is_batch(self) -> bool:
        """Whether the response is a list: a list of prompts, or ``n`` > 1 (as SGLang's)."""
        return self.is_batch_input or self.n > 1

    def replace(self, **changes: Any) -> "GenerateRequest":
        return dataclasses.replace(self, **changes)

    def prompts(self) -> List[PromptInput]:
        """Every prompt to run, in SGLang's order: with ``n`` > 1, [every prompt, sample 0],
        [every prompt, sample 1], ...; sample j has ``n`` removed and, with a
        ``sampling_seed``, seed + j, so samples differ but each stays reproducible."""
        count = self.prompt_count
        if self.text is not None:
            texts = [self.text] if isinstance(self.text, str) else list(self.text)
            inputs = [(t, None) for t in texts]
        else:
            rows = list(self.input_ids) if self.is_batch_input else [self.input_ids]
            inputs = [(None, list(row)) for row in rows]
        params = self.sampling_params
        per_prompt = list(params) if isinstance(params, (list, tuple)) else [params] * count
        keys = self.extra_key
        namespaces = [keys] * count if keys is None or isinstance(keys, str) else list(keys)
        n = self.n
        return [PromptInput(text, ids, _sample_params(p, j) if n > 1 else dict(p or {}), namespace)
                for j in range(n)
                for (text, ids), p, namespace in zip(inputs, per_prompt, namespaces)]


def _sample_params(params: Optional[Dict[str, Any]], j: int) -> Dict[str, Any]:
    out = {k: v for k, v in (params or {}).items() if k != "n"}
    seed = out.get("sampling_seed")
    if is_int(seed):
        out["sampling_seed"] = seed + j
    return out


__all__ = ["GenerateRequest", "PromptInput", "RequestError", "check_fields", "GENERATE_FIELDS",
           "NEUTRAL_GENERATE_FIELDS", "ANY_VALUE", "is_int"]
