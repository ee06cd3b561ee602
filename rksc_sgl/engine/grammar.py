"""Constrained decoding (``regex``, ``json_schema``, ``ebnf``, ``structural_tag``, frontend
``dtype``) with xgrammar.

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
GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "structural_tag")
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

    SGLang's ``/generate`` takes ``json_schema`` and ``structural_tag`` as JSON strings; a
    dict (what people write in Python) is serialised here so both work. msgspec does not
    type-check.
    """
    for kind in ("json_schema", "structural_tag"):
        if isinstance(raw.get(kind), dict):
            raw[kind] = json.dumps(raw[kind])
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
            if kind == "structural_tag":
                return compiler.compile_structural_tag(structural_tag_for_xgrammar(pattern))
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


def structural_tag_for_xgrammar(pattern: str):
    """What SGLang's ``XGrammarGrammarBackend.dispatch_structural_tag`` hands to xgrammar's
    ``compile_structural_tag`` for a ``structural_tag`` JSON string.

    Two forms: the legacy ``{"structures": [{"begin", "schema", "end"}, ...], "triggers":
    [...], "at_least_one": false}`` becomes an ``xgrammar.StructuralTag`` (triggered tags
    whose content is the JSON schema; a missing schema is ``{}``); the newer ``{"type":
    "structural_tag", "format": {...}}`` goes to xgrammar as JSON, with every missing
    ``json_schema`` of a ``json_schema``/``qwen_xml_parameter`` format set to ``{}``.
    Where SGLang would fail with an assertion or a ``KeyError``, this raises ``ValueError``.
    """
    import xgrammar as xgr

    try:
        tag = json.loads(pattern)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON: {e}") from None
    if not isinstance(tag, dict):
        raise ValueError(f"must be a JSON object, got {type(tag).__name__}")
    if tag.get("structures") is not None:
        structures, triggers = tag["structures"], tag.get("triggers")
        if triggers is None:
            raise ValueError('the legacy form needs "triggers" next to "structures"')
        if not isinstance(structures, list) or not all(isinstance(s, dict) for s in structures):
            raise ValueError('"structures" must be a list of objects')
        items = []
        for i, structure in enumerate(structures):
            missing = [k for k in ("begin", "end") if k not in structure]
            if missing:
                raise ValueError(f"structures[{i}] has no {' or '.join(repr(k) for k in missing)}")
            schema = structure.get("schema")
            items.append(_pydantic_checked(
                xgr.StructuralTagItem, begin=structure["begin"], end=structure["end"],
                schema=json.dumps({} if schema is None else schema)))
        try:
            converted = xgr.StructuralTag.from_legacy_structural_tag(items, triggers)
        except ValueError as e:  # pydantic's ValidationError (bad triggers, a schema not an object)
            raise ValueError(_pydantic_message(e)) from None
        at_least_one = tag.get("at_least_one", False)
        if not isinstance(at_least_one, bool):
            raise ValueError(f'"at_least_one" must be a boolean, got {at_least_one!r}')
        converted.format.at_least_one = at_least_one
        return converted
    form = tag.get("format")
    if form is None:
        raise ValueError('needs "format" (or the legacy "structures" and "triggers")')
    if isinstance(form, dict):
        _fill_missing_json_schemas(form)
        return json.dumps(tag)
    return pattern


def _fill_missing_json_schemas(form) -> None:
    """SGLang's ``_sanitize_structural_format``: a missing ``json_schema`` means ``{}``."""
    if not isinstance(form, dict):
        return
    kind = form.get("type")
    if kind in ("json_schema", "qwen_xml_parameter") and form.get("json_schema") is None:
        form["json_schema"] = {}
    if kind == "tag":
        _fill_missing_json_schemas(form.get("content"))
    elif kind in ("sequence", "or"):
        for element in form.get("elements", []) or []:
            _fill_missing_json_schemas(element)
    elif kind in ("triggered_tags", "tags_with_separator"):
        for element in form.get("tags", []) or []:
            _fill_missing_json_schemas(element)


def _pydantic_checked(model, **fields):
    try:
        return model(**fields)
    except ValueError as e:
        raise ValueError(_pydantic_message(e)) from None


def _pydantic_message(error: ValueError) -> str:
    """One line per field pydantic rejected (its own text spans several lines)."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return str(error)
    return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in errors())


def _xgrammar_message(error: BaseException) -> str:
    """xgrammar's messages start with a timestamp and a C++ source location, sometimes
    with the failed C++ check after it; drop those."""
    text = str(error).strip()
    text = re.sub(r"^\[[0-9:]+\]\s*\S+:\d+:\s*", "", text)
    text = re.sub(r"^Check failed: .*? is false:\s*", "", text)
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
