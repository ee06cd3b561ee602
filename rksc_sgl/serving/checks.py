"""What a request may carry, checked: SGLang's /generate fields, OpenAI's fields, prompts and chat messages."""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import HTTPError


GENERATE_FIELDS = frozenset({
    "text", "input_ids", "sampling_params", "return_logprob", "logprob_start_len",
    "top_logprobs_num", "return_text_in_logprobs", "stream", "extra_key",
})
_ANY = object()  # a field accepted (and ignored) whatever its value
# Fields SGLang clients may send with a neutral value; accepted only when they are neutral.
_NEUTRAL_FIELDS = {"image_data": (None, [], ""), "rid": (None,), "lora_path": (None,),
                   "return_hidden_states": (None, False), "log_metrics": (None, True)}

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
    "user": _ANY, "metadata": _ANY, "service_tier": _ANY, "parallel_tool_calls": _ANY,
    "store": (None, False), "suffix": (None, ""), "best_of": (None, 1),
    "tools": (None, []), "functions": (None, []), "tool_choice": (None, "none"), "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}), "modalities": (None, ["text"]),
}
_MESSAGE_FIELDS = frozenset({"role", "content", "name"})
_NEUTRAL_MESSAGE_FIELDS = {"tool_calls": (None, []), "refusal": (None,), "function_call": (None,)}
_CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_IMAGE_PARTS = ("image_url", "input_image", "image", "image_file")


# ---- request parsing ---------------------------------------------------------------------------
def _check_fields(body: Dict[str, Any], allowed: Iterable[str], neutral: Dict[str, Any],
                  where: str = "request") -> None:
    """Reject unknown fields (naming them); drop the tolerated ones (``neutral``: field ->
    ``_ANY`` or the values it is accepted with)."""
    unknown = []
    for key in list(body):
        if key in allowed:
            continue
        if key in neutral and (neutral[key] is _ANY or body[key] in neutral[key]):
            del body[key]
            continue
        unknown.append(key)
    if unknown:
        raise HTTPError(400, f"unknown or unsupported {where} fields: {sorted(unknown)}")


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
        if all(_is_int(t) for t in prompt):
            return [("input_ids", prompt)]
        if all(isinstance(p, list) and p and all(_is_int(t) for t in p) for p in prompt):
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
        _check_fields(message, _MESSAGE_FIELDS, _NEUTRAL_MESSAGE_FIELDS, where=where)
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


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
