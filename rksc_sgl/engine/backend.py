"""The embedded engine: an SGLang frontend backend that runs the model in-process.

``sgl.set_default_backend(Engine(...))`` makes any unmodified ``@sgl.function`` program
run here. The request path is short: backend method -> ``Engine.generate_request``
(SGLang's ``/generate`` request and response shapes) -> ``Scheduler`` (batching, KV
cache) -> ``ModelRunner``. The HTTP server will call ``generate_request`` too, so both
share one scheduler and differ only in their I/O.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import queue
import time
import uuid
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union

import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from sglang.lang.backend.base_backend import BaseBackend
    from sglang.lang.backend.runtime_endpoint import compute_normalized_prompt_logprobs
    from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
    from sglang.lang.global_config import global_config
    from sglang.lang.interpreter import StreamExecutor
    from sglang.lang.ir import SglSamplingParams

from rksc_sgl.rksc.branch_stop import STOPPED_MESSAGE, StreamControls, stopped_meta_info
from rksc_sgl.model.chat import chat_template_for
from rksc_sgl.config import EngineConfig
from rksc_sgl.engine.grammar import GrammarCache, apply_dtype
from rksc_sgl.kv.join import JoinedContext, JoinRegistry, join_namespace, joined_tokens, split_segments
from rksc_sgl.kv.manager import KVCacheExhausted, KVCacheManager
from rksc_sgl.model.runner import ForwardItem, ModelRunner
from rksc_sgl.model.loading import TORCH_DTYPES, load_model_and_tokenizer, resolve_model_dir
from rksc_sgl.rksc.tree_cache import RKSCRadixCache
from rksc_sgl.engine.sampling import parse_sampling_params
from rksc_sgl.engine.scheduler import EngineStats, Request, Scheduler

logger = logging.getLogger(__name__)

_STREAM_END = object()


class Engine(BaseBackend):
    """In-process SGLang backend over SGLang's KV pools and radix tree.

    ``Engine(model="smollm2-135m", cache="radix")``; every other keyword is a field of
    :class:`EngineConfig`. Use it as a context manager, or call ``shutdown()``.
    """

    def __init__(self, model: str = "smollm2-135m", cache: str = "radix", *, config: Optional[EngineConfig] = None,
                 **kwargs: Any):
        super().__init__()
        self.config = config if config is not None else EngineConfig(model=model, cache=cache, **kwargs)
        cfg = self.config
        self.is_chat_model = False
        # join(mode="concate_and_append") concatenates the branches' cached KV (rksc_sgl/kv/join.py);
        # without a prefix cache there is no branch KV to concatenate: SGLang joins by text.
        self.support_concate_and_append = cfg.cache_spec.prefix_cache
        self.joins = JoinRegistry()
        self.model_dir = resolve_model_dir(cfg.model, cfg.resolved_cache_dir)
        self.hf_model, self.tokenizer = load_model_and_tokenizer(self.model_dir, TORCH_DTYPES[cfg.dtype])
        self.hf_model.to(cfg.device)
        hf_config = self.hf_model.config
        self.vocab_size = hf_config.vocab_size
        self.context_len = cfg.max_context_len or getattr(hf_config, "max_position_embeddings", 4096)
        self.chat_template = chat_template_for(self.tokenizer, cfg.model)
        self.eos_ids = self._eos_ids()
        self.grammars = GrammarCache(self.tokenizer, self.vocab_size, self.eos_ids)
        self.kv = KVCacheManager(
            ModelRunner.layout_of(self.hf_model),
            pool_tokens=cfg.kv_pool_tokens,
            max_requests=cfg.max_running_requests,
            max_context_len=self.context_len,
            enable_prefix_cache=cfg.cache_spec.prefix_cache,
            eviction_policy=cfg.eviction_policy,
            eviction_policy_config=cfg.eviction_policy_config,
            device=cfg.device,
            attention_stats=cfg.needs_attention_stats,
            **self._tree_cache_kwargs(),
        )
        self.runner = ModelRunner(self.hf_model, self.kv.kv_pool, cfg.shared_prefix_min_tokens,
                                  attention_backend=cfg.attention_backend)
        self._wire_asks_layer()
        if self.runner.can_rotate_keys and cfg.asks.reuses_shifted(cfg.dtype):  # ASKS: shifted donor tokens too
            self.kv.rotate_keys = self.runner.rotate_keys
        if self.kv.slot_attention is not None:  # RSBCM eviction or compression: collect decode attention
            stride = getattr(getattr(self.kv.tree, "eviction_strategy", None), "attention_layer_stride", None)
            if stride is None:
                stride = cfg.compression.attention_layer_stride
            self.runner.collect_attention(self.kv.slot_attention, stride)
        self.scheduler = Scheduler(
            self.runner,
            self.kv,
            max_running=cfg.max_running_requests,
            max_prefill_tokens=cfg.max_prefill_tokens,
            in_batch_prefix_min_tokens=cfg.in_batch_prefix_min_tokens,
            queue_timeout_s=cfg.queue_timeout_s,
            seed=cfg.seed,
            text_of=self._raw_output_text,
            tail_text_of=self._tail_text,
            num_threads=cfg.num_threads,
        )
        # Frontend streams a vote stopped: their request is cancelled and its decode KV freed.
        self.stream_controls = StreamControls(abort=lambda req, reason: self.scheduler.cancel(
            req, message=f"{STOPPED_MESSAGE}: {reason}", cache_output=False))

    def _tree_cache_kwargs(self) -> Dict[str, Any]:
        """``cache="rksc"``: build ``RKSCRadixCache`` with the ASKS settings and its key."""
        cfg = self.config
        if not cfg.cache_spec.rksc_tree:
            return {}
        asks = cfg.asks
        asks.check_key_layer(self.hf_model.config.num_hidden_layers)
        embed = self.hf_model.model.embed_tokens

        @torch.inference_mode()
        def token_features(token_ids):
            # Layer 0: the token embeddings, the same lookup the prefill does (no model pass).
            # The tree compares features on the host, wherever the weights live.
            ids = torch.tensor(token_ids, dtype=torch.long, device=embed.weight.device)
            return embed(ids).float().cpu()

        slot_features = None
        if cfg.needs_slot_features:
            # Each slot's hidden state at the key layer, stored by the forward that computes
            # the slot's KV: the node keys (see _wire_asks_layer).
            slot_features = torch.zeros((cfg.kv_pool_tokens + 1, self.hf_model.config.hidden_size),
                                        dtype=torch.float32, device=cfg.device)
        return {"tree_cache_class": functools.partial(RKSCRadixCache, asks=asks, token_features=token_features,
                                                      slot_features=slot_features)}

    def _wire_asks_layer(self) -> None:
        """ASKS above layer 0: the runner stores every computed slot's key-layer hidden
        state, and a recipient's span is keyed by running it through the first
        ``key_layer`` blocks over its exact prefix, in scratch slots freed right after (the
        key cost, counted in ``EngineStats.key_tokens``)."""
        slot_features = getattr(self.kv.tree, "slot_features", None)
        if slot_features is None:
            return
        layer = self.config.asks.key_layer
        self.runner.capture_features(slot_features, layer)
        kv, runner = self.kv, self.runner

        def span_features(prefix_slots: torch.Tensor, span_ids: List[int]) -> Optional[torch.Tensor]:
            try:
                with kv.scratch(len(span_ids)) as scratch:
                    item = ForwardItem(list(span_ids), len(prefix_slots), torch.cat([prefix_slots, scratch]))
                    return runner.hidden_at([item], layer).float()
            except KVCacheExhausted:
                return None  # no room to key the span now: this request matches exactly

        kv.span_features = span_features

    # ---- lifecycle / introspection -----------------------------------------------------
    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        self.scheduler.shutdown()

    @property
    def tree_cache(self):
        """The tree cache instance (SGLang's ``RadixCache`` for ``cache='radix'``)."""
        return self.kv.tree

    def stats(self, reset_peak: bool = False) -> EngineStats:
        """A snapshot of the counters. ``reset_peak=True`` starts a new window for the
        peak KV working set, so ``stats().since(before)`` reports that window's peak."""
        def snapshot():
            snap = self.scheduler.stats.snapshot()
            if reset_peak:
                self.scheduler.stats.peak_kv_tokens = 0
                self.scheduler.note_peak()
            return snap
        return self.scheduler.call(snapshot)

    def check_integrity(self, expect_idle: bool = True) -> None:
        """Assert the slot/lock invariants on the scheduler thread (waits for idle first)."""
        if expect_idle and not self.scheduler.wait_idle(timeout=120):
            raise TimeoutError("engine did not become idle")
        self.scheduler.call(lambda: self.kv.check_integrity(expect_idle=expect_idle))

    def flush_cache(self) -> bool:
        return self.scheduler.call(self.kv.flush)

    # ---- CGEE: the YES/NO verifier pass with layer exit (see rksc_sgl/rksc/verifier.py) -----------
    def verify_yes_no(self, prompts: Sequence[str], policy=None, trace: bool = False):
        """Score "Yes" vs "No" as the next token of each prompt, in one batched pass on the
        scheduler thread (never racing a step), reusing cached prefixes read-only.

        ``policy`` (:class:`~rksc_sgl.rksc.verifier.ExitPolicy`) lets prompts leave at an
        intermediate layer; ``None`` or ``enabled=False`` runs every layer (the full pass).
        Returns one :class:`~rksc_sgl.rksc.verifier.YesNoScore` per prompt.
        """
        from rksc_sgl.rksc.verifier import ExitPolicy, LayerExitVerifier, verdict_token_ids

        if getattr(self, "_yes_no_verifier", None) is None:
            yes, no = verdict_token_ids(self.tokenizer)
            self._yes_no_verifier = LayerExitVerifier(self.runner, self.kv, yes, no)
        verifier = self._yes_no_verifier
        ids = [self.encode(p) for p in prompts]
        policy = policy if policy is not None else ExitPolicy(enabled=False)
        return self.scheduler.call(lambda: verifier.score(ids, policy, trace), timeout=600.0)

    def get_model_name(self) -> str:
        return self.config.model

    def get_server_info(self) -> Dict[str, Any]:
        return {"model_path": str(self.model_dir), **dataclasses.asdict(self.config)}

    # ---- SGLang /generate, in-process ----------------------------------------------------
    def generate_request(
        self,
        text: Union[str, Sequence[str], None] = None,
        input_ids: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
        sampling_params: Optional[Dict[str, Any]] = None,
        return_logprob: bool = False,
        logprob_start_len: int = -1,
        top_logprobs_num: int = 0,
        return_text_in_logprobs: bool = False,
        stream: bool = False,
        extra_key: Union[str, Sequence[str], None] = None,
        stream_id: Optional[str] = None,
    ):
        """Serve one SGLang ``/generate`` request; a batch (list of texts) returns a list.

        ``stream_id``: the frontend stream (``StreamExecutor.sid``) the request belongs to,
        so :func:`rksc_sgl.vote` can stop it (``stop_stream``).

        ``extra_key`` (as SGLang's): the request only matches, and only adds to, cached KV
        of the same key (one for all prompts of a batch, or one per prompt).

        ``sampling_params`` is one dict for every prompt or, as in SGLang, a list with one
        dict per prompt of a batch. With ``stream=True`` (single prompt only) returns an
        iterator of response dicts whose ``text`` grows, as the HTTP server streams them.
        """
        prompts, batch = self._prompts(text, input_ids)
        if isinstance(sampling_params, (list, tuple)):
            if not batch or len(sampling_params) != len(prompts):
                raise ValueError(f"a list of sampling_params needs one entry per prompt of a batch "
                                 f"({len(prompts)} prompts, {len(sampling_params)} entries)")
            per_prompt = list(sampling_params)
        else:
            per_prompt = [sampling_params] * len(prompts)
        namespaces = _per_prompt_keys(extra_key, len(prompts), batch)
        n = _parallel_samples(per_prompt)
        if n > 1:
            # As SGLang's /generate: n samples of every prompt, returned as one list in the
            # order [every prompt, sample 0], [every prompt, sample 1], ...
            prompts, namespaces = prompts * n, namespaces * n
            per_prompt = [_sample_params(p, j) for j in range(n) for p in per_prompt]
            batch = True
        if stream and batch:
            raise ValueError("streaming is supported for a single prompt and n=1 only")
        # Validate every prompt of a batch before any of them starts running.
        pendings = [
            self._prepare(ids, params, return_logprob, logprob_start_len, top_logprobs_num, namespace)
            for ids, params, namespace in zip(prompts, per_prompt, namespaces)
        ]
        if stream_id is not None:  # a frontend stream: one prompt, stoppable (rksc_sgl.vote)
            if len(pendings) != 1:
                raise ValueError("a stream_id request has exactly one prompt")
            refused = self.stream_controls.start(stream_id, pendings[0].req,
                                              lambda: self.scheduler.submit(pendings[0].req))
            if refused is not None:
                return self._refused(pendings[0].req, refused, stream)
        else:
            for pending in pendings:
                self.scheduler.submit(pending.req)
        if stream:
            return self._stream(pendings[0], return_logprob, return_text_in_logprobs, stream_id)
        try:
            results = [self._response(p.wait(), return_logprob, return_text_in_logprobs) for p in pendings]
        finally:
            if stream_id is not None:
                self.stream_controls.finished(stream_id)
        return results if batch else results[0]

    def replay(self, input_ids: Sequence[int], compressions: Sequence[Any],
               observe: Callable[[int, Request, torch.Tensor], None], *, forced_ids: Optional[Sequence[int]] = None,
               sampling_params: Optional[Dict[str, Any]] = None) -> List[Request]:
        """Requests after ``input_ids`` whose every step is observed, one per entry of
        ``compressions`` (a ``CompressionConfig``, a mapping of its fields, or None: full
        KV, whatever the engine's ``compression``), submitted together so they decode as
        one batch. With ``forced_ids`` each is teacher-forced: it emits exactly those
        tokens while its compressor runs as it does in decoding; without, each samples
        with ``sampling_params``. ``observe(i, req, logprobs)`` sees request ``i``'s
        next-token log-probabilities before each token (on the scheduler thread: keep it
        short). Returns the finished requests."""
        from rksc_sgl.rksc.compression import compression_config

        ids = self._check_ids(input_ids)
        configs = [compression_config(c) for c in compressions]
        if any(c is not None for c in configs) and self.kv.slot_attention is None:
            raise ValueError("compressed replays score tokens by attention: start the engine with compression=...")
        forced = None
        if forced_ids is not None:
            if not 1 <= len(forced_ids) <= self.context_len - len(ids):
                raise ValueError(f"a replay needs 1 to {self.context_len - len(ids)} forced tokens, "
                                 f"got {len(forced_ids)}")
            forced = self._check_ids(forced_ids)
            sampling_params = {"max_new_tokens": len(forced), "temperature": 0, "ignore_eos": True}
        pendings = [self._prepare(ids, sampling_params, False, -1, 0) for _ in configs]
        for i, (pending, config) in enumerate(zip(pendings, configs)):
            pending.req.compression, pending.req.forced_ids = config, forced
            pending.req.observe = functools.partial(observe, i)
        for pending in pendings:
            self.scheduler.submit(pending.req)
        return [pending.wait() for pending in pendings]

    def _refused(self, req: Request, reason: str, stream: bool):
        """The response of a request a stopped frontend stream did not run."""
        response = {"text": "", "output_ids": [], "meta_info": stopped_meta_info(len(req.input_ids), reason)}
        return iter([response]) if stream else response

    # ---- branch stop (rksc_sgl.vote) ------------------------------------------------------
    def stop_stream(self, sid: str, reason: str) -> None:
        """Stop a frontend stream: cancel its request in flight (its decode KV is freed,
        not cached) and refuse its next until :meth:`resume_stream`."""
        self.stream_controls.stop(sid, reason)

    def resume_stream(self, sid: str) -> None:
        self.stream_controls.resume(sid)

    def seed_stream(self, sid: str, seed: int) -> None:
        """The stream's next gen samples with ``sampling_seed=seed`` (:func:`rksc_sgl.seed_branches`)."""
        self.stream_controls.seed(sid, seed)

    def _prompts(self, text, input_ids):
        """Token ids of every prompt, and whether the request was a batch."""
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if text is not None:
            if isinstance(text, str):
                return [self.encode(text)], False
            return [self.encode(t) for t in text], True
        if input_ids and isinstance(input_ids[0], (list, tuple)):
            return [self._check_ids(ids) for ids in input_ids], True
        return [self._check_ids(input_ids)], False

    def _check_ids(self, ids) -> List[int]:
        ids = list(ids)
        if not ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"input_ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return ids

    def encode(self, text: str) -> List[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise ValueError("the prompt is empty")
        return ids

    def _prepare(self, ids, sampling_params, return_logprob, logprob_start_len, top_logprobs_num,
                 namespace: Optional[str] = None) -> "_Pending":
        params = parse_sampling_params(sampling_params, self.tokenizer, self.vocab_size)
        grammar = self.grammars.request_grammar(params)  # compiled here: a bad pattern fails this call
        if len(ids) >= self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context length is {self.context_len}")
        params.max_new_tokens = min(params.max_new_tokens, self.context_len - len(ids))
        if top_logprobs_num < 0:
            raise ValueError("top_logprobs_num must be >= 0")
        logprob_start = None
        if return_logprob and logprob_start_len is not None and logprob_start_len >= 0:
            if logprob_start_len >= len(ids):
                raise ValueError(f"logprob_start_len={logprob_start_len} is past the prompt ({len(ids)} tokens)")
            logprob_start = logprob_start_len
        stop_ids = set() if params.ignore_eos else set(self.eos_ids)
        stop_ids |= set(params.stop_token_ids or ())
        pending = _Pending()
        req = Request(
            rid=uuid.uuid4().hex,
            input_ids=ids,
            params=params,
            stop_ids=frozenset(stop_ids),
            logprob_start=logprob_start,
            top_logprobs_num=top_logprobs_num if return_logprob else 0,
            want_logprobs=return_logprob,
            on_event=pending.on_event,
            grammar=grammar,
            # sampling_seed: this request samples from its own generator (reproducible
            # whatever else runs); otherwise from the scheduler's shared one.
            generator=None if params.sampling_seed is None else torch.Generator().manual_seed(params.sampling_seed),
            namespace=namespace,
            compression=self.config.compression,
        )
        pending.req = req
        return pending

    # ---- responses ------------------------------------------------------------------------
    def _tail_text(self, req: Request, last_tokens: int) -> str:
        """The last ``last_tokens`` output tokens decoded as they are, as SGLang's
        ``Req.tail_str`` decodes the text it searches stop regexes in (special tokens included)."""
        return self.tokenizer.decode(req.output_ids[-last_tokens:]) if last_tokens > 0 else ""

    def _raw_output_text(self, req: Request) -> str:
        """The output decoded (without a final stop token)."""
        ids = req.output_ids
        # A grammar ends on EOS even with ignore_eos; its finish reason names that token.
        matched = (req.finish_reason or {}).get("matched")
        if ids and (ids[-1] in req.stop_ids or (isinstance(matched, int) and matched == ids[-1])):
            ids = ids[:-1]
        return self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)

    def _output_text(self, req: Request) -> str:
        text = self._raw_output_text(req)
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

    def _response(self, req: Request, return_logprob: bool, with_text: bool) -> Dict[str, Any]:
        return {"text": self._output_text(req), "output_ids": list(req.output_ids),
                "meta_info": self._meta_info(req, return_logprob, with_text)}

    def _meta_info(self, req: Request, return_logprob: bool, with_text: bool) -> Dict[str, Any]:
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
        if pairs is None:
            return None
        return [(lp, tid, self.tokenizer.decode([tid]) if with_text else None) for lp, tid in pairs]

    def _stream(self, pending: "_Pending", return_logprob: bool, with_text: bool,
                stream_id: Optional[str] = None) -> Iterator[Dict[str, Any]]:
        """Yield responses with the text so far; hold back what could still be cut at the
        end: a stop string, or a stop regex's pattern (the only text a regex cuts, see
        ``_output_text``)."""
        req = pending.req
        holdback = max((len(s) for s in (*req.params.stop_strs, *req.params.stop_regex_strs)), default=0)
        try:
            for finished in pending.events():
                if finished:
                    yield self._response(req, return_logprob, with_text)
                    return
                if req.finish_reason is not None:
                    continue  # it finished meanwhile: the final event follows, with the trimmed text
                text = self._raw_output_text(req)
                text = text[: len(text) - holdback] if holdback else text
                yield {"text": text.rstrip("\ufffd"), "output_ids": list(req.output_ids),
                       "meta_info": self._meta_info(req, return_logprob, with_text)}
        finally:
            if req.finish_reason is None:
                self.scheduler.cancel(req)  # consumer stopped early: free its KV
            if stream_id is not None:
                self.stream_controls.finished(stream_id)

    # ---- SGLang frontend backend interface ----------------------------------------------------
    def cache_prefix(self, prefix_str: str) -> None:
        self.generate_request(text=prefix_str, sampling_params={"max_new_tokens": 0})

    def commit_lazy_operations(self, s: StreamExecutor) -> None:
        if s.fork_start_text_pos is not None:  # a branch: a join may need its text
            self.joins.record_branch(s.sid, s.text_[: s.fork_start_text_pos], s.text_[s.fork_start_text_pos :])
        self.generate_request(**self._prompt_of(s, s.text_), sampling_params={"max_new_tokens": 0})

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
                lambda: self.kv.concatenate(prefix_ids, segments, self.runner.rotate_keys, namespace))
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

    def _frontend_request(self, s: StreamExecutor, sampling_params: SglSamplingParams) -> Dict[str, Any]:
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
        request = {**self._prompt_of(s, s.text_), "sampling_params": params}
        for name in ("return_logprob", "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs"):
            value = getattr(sampling_params, name, None)
            if value is not None:
                request[name] = value
        return request

    def generate(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        out = self.generate_request(**self._frontend_request(s, sampling_params), stream_id=s.sid)
        return out["text"], out["meta_info"]

    def generate_stream(self, s: StreamExecutor, sampling_params: SglSamplingParams):
        sent = 0
        for out in self.generate_request(**self._frontend_request(s, sampling_params), stream=True,
                                         stream_id=s.sid):
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
        prompt = self.generate_request(**self._prompt_of(s, s.text_), sampling_params={"max_new_tokens": 0})
        start = max(prompt["meta_info"]["prompt_tokens"] - 2, 0)
        scored = self.generate_request(
            **self._batch_prompt_of(s, [s.text_ + c for c in choices]),
            sampling_params={"max_new_tokens": 0, "temperature": 0},
            return_logprob=True, return_text_in_logprobs=True, logprob_start_len=start,
        )
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
            uncond = self.generate_request(
                input_ids=[[t[1] for t in lps] for lps in input_lps],
                sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0,
            )
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in uncond]
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=normalized,
            input_token_logprobs=input_lps,
            output_token_logprobs=output_lps,
            unconditional_token_logprobs=unconditional,
        )

    def _eos_ids(self) -> frozenset:
        ids = set()
        gen_eos = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.hf_model.config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)


def _parallel_samples(per_prompt: List[Optional[Dict[str, Any]]]) -> int:
    """``n`` of a request (SGLang: the same for every prompt of a batch)."""
    values = {(p or {}).get("n", 1) for p in per_prompt}
    values = {1 if v is None else v for v in values}
    if len(values) != 1:
        raise ValueError("n must be the same for every prompt of a batch")
    n = values.pop()
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive integer, got {n!r}")
    return n


def _sample_params(params: Optional[Dict[str, Any]], j: int) -> Dict[str, Any]:
    """Sample ``j`` of a parallel-sampling request: ``n`` removed and, when the request
    has a ``sampling_seed``, seed + j, so the samples differ but stay reproducible."""
    out = {k: v for k, v in (params or {}).items() if k != "n"}
    seed = out.get("sampling_seed")
    if isinstance(seed, int) and not isinstance(seed, bool):
        out["sampling_seed"] = seed + j
    return out


def _per_prompt_keys(extra_key, n: int, batch: bool) -> List[Optional[str]]:
    """One ``extra_key`` per prompt: a string (or None) for all, or a list for a batch."""
    if extra_key is None or isinstance(extra_key, str):
        return [extra_key] * n
    keys = list(extra_key) if isinstance(extra_key, (list, tuple)) else None
    if keys is None or not batch or len(keys) != n or not all(k is None or isinstance(k, str) for k in keys):
        raise ValueError(f"extra_key must be a string, or a list of {n} strings for a batch of {n} prompts")
    return keys


class _Pending:
    """Bridge between the scheduler thread and the caller waiting on one request."""

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


def _mean_prob(logprobs: List[float]) -> Optional[float]:
    if not logprobs:
        return None
    return math.fsum(math.exp(lp) for lp in logprobs) / len(logprobs)
