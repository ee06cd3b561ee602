"""What the server allows on top of the engine's request checks (``ServerLimits``), and OpenAI's
fields, prompts and chat messages, checked."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from rksc_sgl.engine.request_input import ANY_VALUE, GenerateRequest, check_fields, is_int

from .errors import HTTPError
from .openai import OpenAIJob
from .served import render_chat

if TYPE_CHECKING:
    from .served import ServedModel

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_NEW_TOKENS_CAP = 4096
DEFAULT_MAX_BATCH = 256
DEFAULT_NEW_TOKENS = 128  # the engine's default when a request does not say


# ---- OpenAI API -------------------------------------------------------------------------------
OPENAI_MAX_N = 8  # choices per prompt
OPENAI_MAX_STREAM_CHOICES = 8  # choices of one streamed request (prompts x n): one engine stream each
OPENAI_MAX_TOP_LOGPROBS = 20
OPENAI_COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions

# OpenAI request fields that are SGLang sampling parameters (the value passes through and the
# engine checks it as it checks /generate's). top_k and below are SGLang/vLLM extensions.
_OPENAI_SAMPLING = {
    "temperature": "temperature", "top_p": "top_p", "stop": "stop",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "logit_bias": "logit_bias",
    "top_k": "top_k", "min_p": "min_p", "repetition_penalty": "repetition_penalty",
    "min_tokens": "min_new_tokens", "stop_token_ids": "stop_token_ids", "ignore_eos": "ignore_eos",
    "skip_special_tokens": "skip_special_tokens",
}
_OPENAI_COMMON = frozenset({"model", "n", "stream", "stream_options", "seed", "max_tokens", *_OPENAI_SAMPLING})
COMPLETION_FIELDS = _OPENAI_COMMON | {"prompt", "echo", "logprobs"}
CHAT_FIELDS = _OPENAI_COMMON | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
# Harmless OpenAI fields: ignored whatever their value, or accepted with their neutral value only.
OPENAI_IGNORED_FIELDS = {
    "user": ANY_VALUE, "metadata": ANY_VALUE, "service_tier": ANY_VALUE, "parallel_tool_calls": ANY_VALUE,
    "store": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})
_NEUTRAL_MESSAGE_FIELDS = {"tool_calls": (None, []), "refusal": (None,), "function_call": (None,)}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_IMAGE_PARTS = ("image_url", "input_image", "image", "image_file")


# ---- what this server allows ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """The server's own caps on a request, on top of the engine's checks."""

    max_new_tokens_cap: int = DEFAULT_MAX_NEW_TOKENS_CAP
    max_batch: int = DEFAULT_MAX_BATCH
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    def __post_init__(self):
        for name in ("max_new_tokens_cap", "max_batch", "max_request_bytes"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")

    @property
    def default_new_tokens(self) -> int:
        """``max_new_tokens`` of a request that does not say (SGLang's default, within the cap)."""
        return min(DEFAULT_NEW_TOKENS, self.max_new_tokens_cap)

    def apply(self, request: GenerateRequest) -> GenerateRequest:
        """The request with the default ``max_new_tokens`` filled in, or a 400 when it asks
        for more tokens, prompts or sequences (prompts x n) than the server allows."""
        if request.is_batch_input and request.prompt_count > self.max_batch:
            raise HTTPError(400, f"batch of {request.prompt_count} prompts is over the limit of {self.max_batch}")
        total = request.prompt_count * request.n
        if total > self.max_batch:
            raise HTTPError(400, f"{total} sequences (prompts x n) is over the limit of {self.max_batch}")
        params = request.sampling_params
        if isinstance(params, (list, tuple)):
            return request.replace(sampling_params=[self._params(p) for p in params])
        return request.replace(sampling_params=self._params(params))

    def _params(self, params: Optional[Dict[str, Any]]) -> Dict[str, Any]:
        params = dict(params or {})
        max_new = params.get("max_new_tokens")
        if max_new is None:
            params["max_new_tokens"] = self.default_new_tokens
        elif is_int(max_new) and max_new > self.max_new_tokens_cap:
            raise HTTPError(400, f"max_new_tokens={max_new} is over this server's cap of {self.max_new_tokens_cap}")
        return params


# ---- OpenAI requests ----------------------------------------------------------------------
def openai_job(body: Dict[str, Any], chat: bool, served: "ServedModel", limits: ServerLimits) -> OpenAIJob:
    """An OpenAI request checked and mapped onto engine requests: one batch for every
    choice of every prompt, or one request per choice when streaming."""
    check_fields(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, OPENAI_IGNORED_FIELDS)
    for key in [k for k, v in body.items() if v is None]:
        del body[key]  # null: not given
    model = body.get("model", served.name)
    if not isinstance(model, str):
        raise HTTPError(400, "'model' must be a string")
    if not served.serves(model):
        raise HTTPError(404, f"model {model!r} is not served here; this server serves {served.name!r} "
                             "(see GET /v1/models)")
    n = body.get("n", 1)
    if not is_int(n) or not 1 <= n <= OPENAI_MAX_N:
        raise HTTPError(400, f"'n' must be an integer in [1, {OPENAI_MAX_N}]")
    stream = _bool_field(body, "stream")
    options = body.get("stream_options", {})
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise HTTPError(400, "'stream_options' must be an object with only 'include_usage'")
    include_usage = _bool_field(options, "include_usage", "stream_options.include_usage")

    if chat:
        max_tokens, key = body.get("max_completion_tokens"), "max_completion_tokens"
        if max_tokens is None:
            max_tokens, key = body.get("max_tokens"), "max_tokens"
        default_tokens, least = limits.default_new_tokens, 1
    else:
        max_tokens, key = body.get("max_tokens"), "max_tokens"
        default_tokens, least = min(OPENAI_COMPLETION_DEFAULT_TOKENS, limits.max_new_tokens_cap), 0
    if max_tokens is None:
        max_tokens = default_tokens
    elif not is_int(max_tokens) or max_tokens < least:
        raise HTTPError(400, f"{key!r} must be an integer >= {least}, got {max_tokens!r}")
    elif max_tokens > limits.max_new_tokens_cap:
        raise HTTPError(400, f"{key}={max_tokens} is over this server's cap of {limits.max_new_tokens_cap}")
    params = {"max_new_tokens": max_tokens}
    params.update({name: body[key] for key, name in _OPENAI_SAMPLING.items() if key in body})
    _check_logit_bias(params.get("logit_bias"))
    seed = body.get("seed")
    if seed is not None and not (is_int(seed) and -2**63 <= seed < 2**63):
        raise HTTPError(400, "'seed' must be a 64-bit integer")
    per_choice = [params if seed is None else {**params, "sampling_seed": _wrap_seed(seed + j)}
                  for j in range(n)]

    if chat:
        prompts = [("text", render_chat(served.chat_template, _chat_messages(body.get("messages"))))]
        echo = False
        top = None
        if _bool_field(body, "logprobs"):
            top = body.get("top_logprobs", 0)
            if not is_int(top) or not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS:
                raise HTTPError(400, f"'top_logprobs' must be an integer in [0, {OPENAI_MAX_TOP_LOGPROBS}]")
        elif "top_logprobs" in body:
            raise HTTPError(400, "'top_logprobs' needs 'logprobs': true")
    else:
        prompts = _completion_prompts(body.get("prompt"))
        echo = _bool_field(body, "echo")
        top = body.get("logprobs")
        if top is not None and (not is_int(top) or not 0 <= top <= OPENAI_MAX_TOP_LOGPROBS):
            raise HTTPError(400, f"'logprobs' must be an integer in [0, {OPENAI_MAX_TOP_LOGPROBS}]")
    if stream and len(prompts) * n > OPENAI_MAX_STREAM_CHOICES:
        raise HTTPError(400, f"a streamed request may have at most {OPENAI_MAX_STREAM_CHOICES} choices "
                             f"(prompts x n); this one has {len(prompts) * n}")

    def native(kind: str, prompt_values: list, sampling_params: list) -> GenerateRequest:
        logprobs = {}
        if top is not None:
            logprobs = dict(return_logprob=True, top_logprobs_num=top, return_text_in_logprobs=True,
                            logprob_start_len=0 if echo else -1)
        return limits.apply(GenerateRequest(**{kind: prompt_values}, sampling_params=sampling_params, **logprobs))

    kind = prompts[0][0]
    if stream:  # one engine stream per choice
        bodies = [native(kind, value, params) for _, value in prompts for params in per_choice]
    else:  # one engine batch for every choice of every prompt
        bodies = [native(kind, [value for _, value in prompts for _ in range(n)], per_choice * len(prompts))]
    return OpenAIJob(chat=chat, id=f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", created=int(time.time()),
                model=model, n=n, stream=stream, include_usage=include_usage, logprobs=top, echo=echo,
                prompts=prompts, bodies=bodies)


def _bool_field(body: Dict[str, Any], key: str, name: Optional[str] = None) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise HTTPError(400, f"{name or key!r} must be a boolean")
    return value


def _wrap_seed(seed: int) -> int:
    return (seed + 2**63) % 2**64 - 2**63


def _check_logit_bias(bias: Any) -> None:
    if bias is None:
        return
    ok = isinstance(bias, dict) and all(
        isinstance(k, str) and k.strip().lstrip("-").isdigit()
        and isinstance(v, (int, float)) and not isinstance(v, bool) and -100 <= v <= 100
        for k, v in bias.items())
    if not ok:
        raise HTTPError(400, "'logit_bias' must map token ids (as strings) to numbers in [-100, 100]")


def _completion_prompts(prompt: Any) -> List[Tuple[str, Any]]:
    """``prompt`` as (native field, value) pairs: ("text", str) or ("input_ids", [int])."""
    if isinstance(prompt, str):
        return [("text", prompt)]
    if isinstance(prompt, list) and prompt:
        if all(isinstance(p, str) for p in prompt):
            return [("text", p) for p in prompt]
        if all(is_int(t) for t in prompt):
            return [("input_ids", prompt)]
        if all(isinstance(p, list) and p and all(is_int(t) for t in p) for p in prompt):
            return [("input_ids", p) for p in prompt]
    if prompt is None:
        raise HTTPError(400, "'prompt' is required")
    raise HTTPError(400, "'prompt' must be a string, a non-empty list of strings, a list of token ids "
                         "or a list of non-empty lists of token ids")


def _chat_messages(messages: Any) -> List[Dict[str, str]]:
    """OpenAI chat messages as SGLang template messages ({role, content} with text content)."""
    if not isinstance(messages, list) or not messages:
        raise HTTPError(400, "'messages' must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise HTTPError(400, f"{where} must be an object with 'role' and 'content'")
        message = dict(message)
        check_fields(message, _MESSAGE_FIELDS, _NEUTRAL_MESSAGE_FIELDS, where=where)
        role = message.get("role")
        if role not in _CHAT_ROLES:
            raise HTTPError(400, f"{where}.role must be one of {sorted(_CHAT_ROLES)}, got {role!r} "
                                 "(tool and function messages are not supported)")
        out.append({"role": _CHAT_ROLES[role], "content": _message_text(message.get("content"), where)})
    return out


def _message_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in _IMAGE_PARTS:
                raise HTTPError(400, f"{where}.content[{j}]: image content is not supported; "
                                     "this server's model is text-only")
            if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise HTTPError(400, f"{where}.content[{j}] must be a text part "
                                     "{\"type\": \"text\", \"text\": \"...\"}")
            texts.append(part["text"])
        return "\n".join(texts)
    raise HTTPError(400, f"{where}.content must be a string or a non-empty list of text parts")
