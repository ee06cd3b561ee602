"""SGLang's frontend backend interface over the engine's one request path.

SGLang's interpreter calls these methods for ``gen``, ``select``, fork commits and joins;
each turns the ``StreamExecutor``'s state into a :class:`GenerateRequest` and runs it
with ``handle`` (the same call the HTTP server makes), so a program and an HTTP client
reach the scheduler the same way. :class:`~rksc_sgl.engine.backend.Engine` is this
backend; what it provides is listed on :class:`FrontendBackend`.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any, Dict, List, Optional

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.lang.backend.base_backend import BaseBackend
    from sglang.lang.backend.runtime_endpoint import compute_normalized_prompt_logprobs
    from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
    from sglang.lang.global_config import global_config
    from sglang.lang.interpreter import StreamExecutor
    from sglang.lang.ir import SglSamplingParams

from rksc_sgl.engine.grammar import apply_dtype
from rksc_sgl.engine.request_input import GenerateRequest
from rksc_sgl.kv.join import JoinedContext, concatenate, join_namespace, joined_tokens, split_segments
from rksc_sgl.kv.manager import KVCacheExhausted

logger = logging.getLogger(__name__)

_LOGPROB_FIELDS = ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs")


class FrontendBackend(BaseBackend):
    """The frontend methods. The engine provides ``handle(GenerateRequest)``, ``encode``,
    ``joins`` (a ``JoinRegistry``), ``stream_controls``, ``scheduler``, ``kv``, ``runner``
    and ``config``."""

    def cache_prefix(self, prefix_str: str) -> None:
        self.handle(GenerateRequest(text=prefix_str, sampling_params={"max_new_tokens": 0}))

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        if s.fork_start_text_pos is not None:  # a branch: a join may need its text
            self.joins.record_branch(s.sid, s.text_[: s.fork_start_text_pos], s.text_[s.fork_start_text_pos :])
        self.handle(GenerateRequest(**self._prompt_of(s, s.text_), sampling_params={"max_new_tokens": 0}))

    def end_program(self, s) -> None:
        for exe in s if isinstance(s, (list, tuple)) else [s]:
            self.joins.end(exe.sid, getattr(exe, "worker", None))

    def concatenate_and_append(self, src_rids: List[str], dst_rid: str) -> None:
        """``join(mode="concate_and_append")``: give the parent the concatenation of the
        branches' KV (see rksc_sgl/kv/join.py for what is exact). Falls back to a text join,
        silently correct, when the branches' KV cannot be used."""
        branches = [self.joins.branch(rid) for rid in src_rids]
        if any(b is None for b in branches) or len({b[0] for b in branches}) != 1:
            logger.debug("concate_and_append: branch texts unknown; joining by text")
            return
        if self.joins.context(dst_rid) is not None:
            logger.debug("concate_and_append: nested join; joining by text")
            return
        prefix_text = branches[0][0]
        split = split_segments(self.encode, prefix_text, [b[1] for b in branches])
        if split is None:
            logger.debug("concate_and_append: a token spans the fork point; joining by text")
            return
        prefix_ids, segments = split
        if len(segments) < 2:
            return  # one branch: its own KV is already the exact cached prefix
        namespace = join_namespace(prefix_ids, segments)
        try:
            built = self.scheduler.call(
                lambda: concatenate(self.kv, prefix_ids, segments, self.runner.rotate_keys, namespace))
        except KVCacheExhausted:
            built = False
        if not built:
            logger.debug("concate_and_append: branch KV not cached or no room; joining by text")
            return
        text = prefix_text + "".join(b[1] for b in branches)
        self.joins.set_context(dst_rid, JoinedContext(text, tuple(joined_tokens(prefix_ids, segments)), namespace))

    def _batch_prompt_of(self, s: StreamExecutor, texts: List[str]) -> Dict[str, Any]:
        prompts = [self._prompt_of(s, t) for t in texts]
        if all("text" in p for p in prompts):
            return {"text": texts}
        return {"input_ids": [p.get("input_ids") or self.encode(p["text"]) for p in prompts],
                "extra_key": [p.get("extra_key") for p in prompts]}

    def _prompt_of(self, s: StreamExecutor, text: str) -> Dict[str, Any]:
        """The request fields for ``text`` sent by executor ``s``: plain text, or, after a
        KV join, the joined tokens plus the rest and the join's namespace."""
        context = self.joins.context(s.sid)
        if context is None or not text.startswith(context.text):
            return {"text": text}
        rest = text[len(context.text) :]
        ids = list(context.token_ids) + (self.encode(rest) if rest else [])
        return {"input_ids": ids, "extra_key": context.namespace}

    def fill_image(self, s: StreamExecutor) -> None:
        raise NotImplementedError(f"{self.config.model} is a text-only model; images are not supported")

    def _frontend_request(self, s: StreamExecutor, sampling_params: SglSamplingParams,
                          stream: bool = False) -> GenerateRequest:
        """The request of one ``gen``: the executor's prompt, SGLang's sampling fields as
        ``RuntimeEndpoint`` sends them, and the stream's seed if a vote set one."""
        if s.images_:
            self.fill_image(s)
        apply_dtype(sampling_params)  # as SGLang's RuntimeEndpoint: dtype -> regex (+ stop strings)
        params = {k: v for k, v in sampling_params.to_srt_kwargs().items() if v is not None}
        if params.get("n", 1) != 1:
            # The interpreter stores one text per gen (RuntimeEndpoint cannot take a list either).
            raise ValueError("gen(n > 1) is not supported by SGLang programs; use s.fork(n)")
        params["skip_special_tokens"] = global_config.skip_special_tokens_in_output
        params["spaces_between_special_tokens"] = global_config.spaces_between_special_tokens_in_out
        if params.get("stop") == ():
            params.pop("stop")
        if not params.get("stop_token_ids"):
            params.pop("stop_token_ids", None)
        seed = self.stream_controls.take_seed(s.sid)
        if seed is not None:
            params["sampling_seed"] = seed
        logprobs = {name: getattr(sampling_params, name, None) for name in _LOGPROB_FIELDS}
        return GenerateRequest(**self._prompt_of(s, s.text_), sampling_params=params, stream=stream,
                               stream_id=s.sid, **{k: v for k, v in logprobs.items() if v is not None})

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        out = self.handle(self._frontend_request(s, sampling_params))
        return out["text"], out["meta_info"]

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        sent = 0
        for out in self.handle(self._frontend_request(s, sampling_params, stream=True)):
            text = out["text"]
            yield text[sent:], out["meta_info"]
            sent = len(text)

    def select(self, s: StreamExecutor, choices: List[str], temperature: float,
               choices_method: Optional[ChoicesSamplingMethod] = None) -> ChoicesDecision:
        """Score choices by token log-probabilities exactly as SGLang's runtime does
        (``RuntimeEndpoint.select``): prefill the prompt once, then score every
        ``prompt + choice`` from two tokens before the prompt's end (token healing)."""
        if choices_method is None:
            from sglang.lang.choices import token_length_normalized
            choices_method = token_length_normalized
        if temperature > 1e-5:
            raise ValueError("select supports temperature 0 only, as SGLang's runtime does")
        prompt = self.handle(GenerateRequest(**self._prompt_of(s, s.text_), sampling_params={"max_new_tokens": 0}))
        start = max(prompt["meta_info"]["prompt_tokens"] - 2, 0)
        scored = self.handle(GenerateRequest(
            **self._batch_prompt_of(s, [s.text_ + c for c in choices]),
            sampling_params={"max_new_tokens": 0, "temperature": 0},
            return_logprob=True, return_text_in_logprobs=True, logprob_start_len=start,
        ))
        input_lps = [r["meta_info"]["input_token_logprobs"] for r in scored]
        output_lps = [r["meta_info"]["output_token_logprobs"] for r in scored]
        normalized = [compute_normalized_prompt_logprobs(lp) for lp in input_lps]
        for i, lps in enumerate(input_lps):
            # The first scored token belongs to the prompt when no token healing happened.
            if len(lps) > 1 and s.text_.endswith(lps[0][2]):
                normalized[i] = (normalized[i] * len(lps) - (lps[0][0] or 0.0)) / (len(lps) - 1)
                input_lps[i] = lps[1:]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            uncond = self.handle(GenerateRequest(
                input_ids=[[t[1] for t in lps] for lps in input_lps],
                sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0,
            ))
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in uncond]
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_lps,
            output_token_logprobs=output_lps,
            unconditional_token_logprobs=unconditional,
        )
