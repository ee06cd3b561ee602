"""Constrained decoding (``regex``, ``json_schema``, ``ebnf``, frontend ``dtype``) with xgrammar.

xgrammar is the grammar engine SGLang's runtime uses (``XGrammarGrammarBackend``); this
module does what that backend does, for the embedded engine on CPU:

- one ``GrammarCompiler`` per engine over ``TokenizerInfo.from_huggingface`` with the
  model's vocabulary size and the model's EOS ids as the stop tokens, so a grammar can only
  end by sampling EOS, which then finishes the request;
- compiled grammars cached per ``(kind, pattern)`` (compiling is the slow part), compiled in
  the caller's thread when a request is submitted, so a bad pattern fails that call with a
  ``ValueError`` and never reaches the scheduler thread;
- one ``GrammarMatcher`` and one bitmask row per request, so branches of a fork that share a
  pattern still advance independently; the scheduler masks a request's own logits before
  sampling it, and only for constrained requests.
"""

from __future__ import annotations

import collections
import json
import re
import threading
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

# Keys of SGLang's SamplingParams that select a grammar, in the order SGLang checks them.
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf")
# SGLang's runtime treats this json_schema value as "any JSON" (builtin JSON grammar).
ANY_JSON = "$$ANY$$"


# ---- frontend dtype ---------------------------------------------------------------------
def apply_dtype(sampling_params) -> None:
    """Turn the frontend's ``dtype`` into a regex, in place, exactly as SGLang's
    ``RuntimeEndpoint._handle_dtype_to_regex`` does (``sgl.gen_int``, ``sgl.gen(dtype=int)``,
    ``sgl.gen_string``, ...): int/float/str/bool map to ``REGEX_INT/FLOAT/STR/BOOL`` of
    ``sglang.lang.ir``, int and float also stop at a space or newline, and dtype wins over
    an explicit regex (with SGLang's warning). The interpreter hands every ``gen`` a fresh
    copy of its parameters, so mutating it is what SGLang does too.

    One difference: an unknown dtype raises ``ValueError`` (SGLang raises RuntimeError),
    the error type the engine uses for every bad request.
    """
    from sglang.lang.ir import REGEX_BOOL, REGEX_FLOAT, REGEX_INT, REGEX_STR

    dtype = sampling_params.dtype
    if dtype is None:
        return
    stop = sampling_params.stop
    # SGLang extends ``stop`` in place; make that work for a str or tuple as well.
    sampling_params.stop = [stop] if isinstance(stop, str) else list(stop or ())
    if dtype in ("int", int):
        regex = REGEX_INT
        sampling_params.stop.extend([" ", "\n"])
    elif dtype in ("float", float):
        regex = REGEX_FLOAT
        sampling_params.stop.extend([" ", "\n"])
    elif dtype in ("str", str):
        regex = REGEX_STR
    elif dtype in ("bool", bool):
        regex = REGEX_BOOL
    else:
        raise ValueError(f"invalid dtype {dtype!r}: use int, float, str or bool")
    if sampling_params.regex is not None:
        warnings.warn(f"Both dtype and regex are set. Only dtype will be used. "
                      f"dtype: {dtype}, regex: {sampling_params.regex}")
    sampling_params.regex = regex


# ---- request parsing ----------------------------------------------------------------------
def normalize_grammar_fields(raw: Dict[str, Any]) -> None:
    """Type-check the grammar fields of a raw request dict, in place.

    SGLang's ``/generate`` takes ``json_schema`` as a JSON string; a dict (what people
    write in Python) is serialised here so both work. msgspec does not type-check.
    """
    schema = raw.get("json_schema")
    if isinstance(schema, dict):
        raw["json_schema"] = json.dumps(schema)
    for kind in GRAMMAR_KINDS:
        value = raw.get(kind)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"sampling parameter {kind!r} must be a string, got {type(value).__name__}")


def grammar_key(params) -> Optional[Tuple[str, str]]:
    """``(kind, pattern)`` of the grammar a request asks for, or None if unconstrained.
    (SGLang's ``SamplingParams.verify`` already rejected more than one.)"""
    for kind in GRAMMAR_KINDS:
        value = getattr(params, kind, None)
        if value:
            return kind, value
    return None


# ---- compiling ------------------------------------------------------------------------------
class GrammarCache:
    """Compiled grammars of one engine, per ``(kind, pattern)``, least recently used first out.

    Thread-safe: requests are submitted from the SGLang interpreter's threads (one per
    forked branch). The xgrammar objects are built on first use so engines that never see
    a constrained request pay nothing. The lock is held while compiling so concurrent
    branches with the same pattern compile it once.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int], max_entries: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self.max_entries = max_entries
        self._compiler = None
        self._compiled: "collections.OrderedDict[Tuple[str, str], Any]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def request_grammar(self, params) -> Optional["RequestGrammar"]:
        """A fresh matcher for the grammar ``params`` asks for (None if unconstrained);
        raises ``ValueError`` naming the problem if xgrammar rejects the pattern."""
        key = grammar_key(params)
        if key is None:
            return None
        return RequestGrammar(self.compiled(*key), self.vocab_size)

    def compiled(self, kind: str, pattern: str):
        with self._lock:
            hit = self._compiled.get((kind, pattern))
            if hit is not None:
                self._compiled.move_to_end((kind, pattern))
                return hit
            grammar = self._compile(kind, pattern)
            self._compiled[(kind, pattern)] = grammar
            if len(self._compiled) > self.max_entries:
                self._compiled.popitem(last=False)
            return grammar

    def __len__(self) -> int:
        return len(self._compiled)

    def _compile(self, kind: str, pattern: str):
        compiler = self._get_compiler()
        try:
            if kind == "regex":
                return compiler.compile_regex(pattern)
            if kind == "ebnf":
                return compiler.compile_grammar(pattern)
            if pattern == ANY_JSON:
                return compiler.compile_builtin_json_grammar()
            _check_json_schema(pattern)
            # SGLang's defaults: any whitespace between JSON tokens, no count limit.
            return compiler.compile_json_schema(pattern, any_whitespace=True)
        except (RuntimeError, ValueError) as e:
            raise ValueError(f"invalid {kind} {_shorten(pattern)!r}: {_xgrammar_message(e)}") from None

    def _get_compiler(self):
        """The tokenizer scan takes a fraction of a second: do it once, on first use.
        xgrammar's own cache is off: ``self._compiled`` is the one cache (bounded)."""
        if self._compiler is None:
            import xgrammar as xgr

            info = xgr.TokenizerInfo.from_huggingface(
                self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        return self._compiler


def _check_json_schema(pattern: str) -> None:
    """Reject what SGLang's runtime rejects before xgrammar sees it: text that is not JSON,
    and schema keywords xgrammar would silently ignore (``validate_xgrammar_json_schema``)."""
    from sglang.srt.constrained.json_schema_validation import validate_xgrammar_json_schema

    try:
        schema = json.loads(pattern)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    validate_xgrammar_json_schema(schema)


def _xgrammar_message(error: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location; drop those."""
    text = str(error).strip()
    text = re.sub(r"^\[[0-9:]+\]\s*\S+:\d+:\s*", "", text)
    return text.splitlines()[0] if text else type(error).__name__


def _shorten(pattern: str, limit: int = 80) -> str:
    return pattern if len(pattern) <= limit else pattern[: limit - 3] + "..."


# ---- per request ------------------------------------------------------------------------------
class RequestGrammar:
    """One request's position in its grammar: an xgrammar matcher and a one-row bitmask.

    The scheduler thread is the only user after submission. ``mask`` fills a preallocated
    bitmask and applies it only when some token is forbidden.
    """

    __slots__ = ("matcher", "bitmask", "vocab_size")

    def __init__(self, compiled, vocab_size: int):
        import xgrammar as xgr

        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)
        self.vocab_size = vocab_size

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits (vocab,) with the tokens the grammar forbids next set to -inf.

        xgrammar fills the bitmask (bit ``t % 32`` of word ``t // 32`` set = token ``t``
        allowed; about 1 us here); it is skipped when every token is allowed. The bits are
        unpacked with torch rather than xgrammar's ``apply_token_bitmask_inplace``: same
        result, but about 45 us per row instead of 165 us on one CPU thread (49k vocab).
        Tokens past the bitmask (a padded LM head) are forbidden. Out of place: the
        runner's logits are inference tensors, and a view of the whole batch's logits.
        """
        if self.matcher.fill_next_token_bitmask(self.bitmask):
            return apply_bitmask(logits, self.bitmask[0])
        return logits

    def accept(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar does not allow it."""
        return self.matcher.accept_token(token)

    @property
    def terminated(self) -> bool:
        """The grammar has accepted its stop token (EOS): the request is done."""
        return self.matcher.is_terminated()


_BIT_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """A copy of ``logits`` with ``-inf`` for every token whose bit is clear in the int32
    ``bitmask`` (xgrammar's layout) and for tokens past its end: what
    ``xgrammar.apply_token_bitmask_inplace`` does to one row, faster on CPU (see
    ``RequestGrammar.mask``)."""
    forbidden = ((bitmask.unsqueeze(-1) >> _BIT_SHIFTS) & 1).view(-1) == 0
    vocab = logits.numel()
    if forbidden.numel() < vocab:
        forbidden = torch.cat([forbidden, forbidden.new_ones(vocab - forbidden.numel())])
    return logits.masked_fill(forbidden[:vocab], float("-inf"))
