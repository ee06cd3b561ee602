"""The embedded engine: an SGLang frontend backend that runs the model in-process.

``sgl.set_default_backend(Engine(...))`` makes any unmodified ``@sgl.function`` program
run here. The request path is short: a frontend method (``engine/frontend.py``) or the
HTTP server builds a :class:`GenerateRequest` -> ``Engine.handle`` checks it against the
model and submits one scheduler ``Request`` per prompt -> ``Scheduler`` (batching, KV
cache) -> ``ModelRunner``. Both callers share one scheduler and differ only in their I/O.

The constructor builds the components in dependency order and hands each its
collaborators: the KV manager (with the tree the cache spec names and the key rotation
ASKS may use), the runner (with the attention statistics and ASKS features it collects),
then the scheduler (with the span keys ASKS matches above layer 0).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch

from rksc_sgl.config import EngineConfig
from rksc_sgl.engine.frontend import FrontendBackend
from rksc_sgl.engine.grammar import GrammarCache
from rksc_sgl.engine.request_input import GenerateRequest, PromptInput
from rksc_sgl.engine.responses import Pending, Responses
from rksc_sgl.engine.sampling import parse_sampling_params
from rksc_sgl.engine.request import EngineStats, Request
from rksc_sgl.engine.scheduler import Scheduler
from rksc_sgl.kv.join import JoinRegistry
from rksc_sgl.kv.manager import KVCacheManager
from rksc_sgl.model.chat import chat_template_for
from rksc_sgl.model.loading import TORCH_DTYPES, load_model_and_tokenizer, resolve_model_dir
from rksc_sgl.model.rope import KeyRotation
from rksc_sgl.model.runner import AttentionStats, FeatureCapture, ModelRunner
from rksc_sgl.rksc.branch_stop import STOPPED_MESSAGE, StreamControls, stopped_meta_info
from rksc_sgl.rksc.rsbcm import RSBCMStrategy
from rksc_sgl.rksc.span_keys import SpanKeys
from rksc_sgl.rksc.tree_cache import RKSCRadixCache

logger = logging.getLogger(__name__)


class Engine(FrontendBackend):
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
        self.responses = Responses(self.tokenizer)
        rotation = KeyRotation(self.hf_model)
        # Per-slot tables the runner fills beside the KV and the tree reads (index = slot):
        # decode attention mass (RSBCM eviction, compression), and the hidden state at the
        # ASKS key layer (node keys above layer 0).
        slots = cfg.kv_pool_tokens + 1
        slot_attention = (torch.zeros(slots, dtype=torch.float32, device=cfg.device)
                          if cfg.needs_attention_stats else None)
        slot_features = (torch.zeros((slots, hf_config.hidden_size), dtype=torch.float32, device=cfg.device)
                         if cfg.needs_slot_features else None)
        self.kv = KVCacheManager(
            ModelRunner.layout_of(self.hf_model),
            pool_tokens=cfg.kv_pool_tokens,
            max_requests=cfg.max_running_requests,
            max_context_len=self.context_len,
            enable_prefix_cache=cfg.cache_spec.prefix_cache,
            eviction_policy=cfg.eviction_policy,
            eviction_policy_config=cfg.eviction_policy_config,
            device=cfg.device,
            slot_attention=slot_attention,
            slot_features=slot_features,
            # ASKS: shifted donor tokens too, their keys rotated to the new position
            rotate_keys=rotation if rotation.supported and cfg.asks.reuses_shifted(cfg.dtype) else None,
            **self._tree_cache_kwargs(slot_features, slot_attention),
        )
        self.runner = ModelRunner(self.hf_model, self.kv.kv_pool, cfg.shared_prefix_min_tokens,
                                  attention_backend=cfg.attention_backend,
                                  attention_stats=self._attention_stats(),
                                  feature_capture=(FeatureCapture(slot_features, cfg.asks.key_layer)
                                                   if slot_features is not None else None))
        self.scheduler = Scheduler(
            self.runner,
            self.kv,
            max_running=cfg.max_running_requests,
            max_prefill_tokens=cfg.max_prefill_tokens,
            in_batch_prefix_min_tokens=cfg.in_batch_prefix_min_tokens,
            queue_timeout_s=cfg.queue_timeout_s,
            seed=cfg.seed,
            text_of=self.responses.raw_output_text,
            tail_text_of=self.responses.tail_text,
            num_threads=cfg.num_threads,
            span_features=(SpanKeys(self.runner, self.kv, cfg.asks.key_layer)
                           if slot_features is not None else None),
        )
        # Frontend streams a vote stopped: their request is cancelled and its decode KV freed.
        self.stream_controls = StreamControls(abort=lambda req, reason: self.scheduler.cancel(
            req, message=f"{STOPPED_MESSAGE}: {reason}", cache_output=False))
        self._yes_no_verifier = None  # built on the first verify_yes_no

    def _tree_cache_kwargs(self, slot_features: Optional[torch.Tensor],
                           slot_attention: Optional[torch.Tensor]) -> Dict[str, Any]:
        """``cache="rksc-tree"``: build ``RKSCRadixCache`` with the ASKS settings and its key."""
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

        return {"tree_cache_class": functools.partial(RKSCRadixCache, asks=asks, token_features=token_features,
                                                      slot_features=slot_features, slot_attention=slot_attention)}

    def _attention_stats(self) -> Optional[AttentionStats]:
        """RSBCM eviction or compression: the runner adds decode attention to the KV
        manager's per-slot table, on RSBCM's sampled layers (or compression's); for RSBCM
        alone only while the pool is near full (``collect_above_usage``)."""
        if self.kv.slot_attention is None:
            return None
        strategy = self.kv.tree.eviction_strategy
        if self.config.compression is not None or not isinstance(strategy, RSBCMStrategy):
            stride = (strategy.attention_layer_stride if isinstance(strategy, RSBCMStrategy)
                      else self.config.compression.attention_layer_stride)
            return AttentionStats(self.kv.slot_attention, stride)  # compression scores every decode step
        pool_tokens, allocator = self.kv.pool_tokens, self.kv.allocator

        def active() -> bool:  # RSBCM alone: only near a full pool (collect_above_usage)
            return strategy.collects(allocator.available_size(), pool_tokens)

        return AttentionStats(self.kv.slot_attention, strategy.attention_layer_stride, active)

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

        if self._yes_no_verifier is None:
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
        """Serve one SGLang ``/generate`` request given as keywords (the fields of
        :class:`~rksc_sgl.engine.request_input.GenerateRequest`); see :meth:`handle`."""
        return self.handle(GenerateRequest(
            text=text, input_ids=input_ids, sampling_params=sampling_params, return_logprob=return_logprob,
            logprob_start_len=logprob_start_len, top_logprobs_num=top_logprobs_num,
            return_text_in_logprobs=return_text_in_logprobs, stream=stream, extra_key=extra_key,
            stream_id=stream_id))

    def handle(self, request: GenerateRequest):
        """Run one request: a response dict, a list of them for a batch (or ``n`` > 1), or,
        with ``stream=True``, an iterator of responses whose ``text`` grows, as the HTTP
        server streams them. Every prompt is checked before any of them starts.

        A ``stream_id`` request belongs to that frontend stream (``StreamExecutor.sid``), so
        :func:`rksc_sgl.vote` can stop it (``stop_stream``)."""
        pendings = [self._prepare(self._prompt_ids(prompt), prompt.sampling_params, request.return_logprob,
                                  request.logprob_start_len, request.top_logprobs_num, prompt.namespace)
                    for prompt in request.prompts()]
        stream_id = request.stream_id
        if stream_id is not None:  # a frontend stream: one prompt, stoppable (rksc_sgl.vote)
            refused = self.stream_controls.start(stream_id, pendings[0].req,
                                                 lambda: self.scheduler.submit(pendings[0].req))
            if refused is not None:
                return self._refused(pendings[0].req, refused, request.stream)
        else:
            for pending in pendings:
                self.scheduler.submit(pending.req)
        with_text = request.return_text_in_logprobs
        if request.stream:
            return self.responses.stream(pendings[0], request.return_logprob, with_text,
                                         on_close=functools.partial(self._stream_closed, stream_id))
        try:
            results = [self.responses.response(p.wait(), request.return_logprob, with_text) for p in pendings]
        finally:
            if stream_id is not None:
                self.stream_controls.finished(stream_id)
        return results if request.is_batch else results[0]

    def _stream_closed(self, stream_id: Optional[str], req: Request) -> None:
        if req.finish_reason is None:
            self.scheduler.cancel(req)  # consumer stopped early: free its KV
        if stream_id is not None:
            self.stream_controls.finished(stream_id)

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

    def stream_top_logprobs(self, sid: str, start: int = 0) -> Optional[List[List[float]]]:
        """The top-k log-probabilities of each token the stream's request in flight has decoded,
        from token ``start`` on, read while it decodes (a vote's token rule, ``deepconf``);
        ``None`` without a request in flight or when its gen asked for none
        (``return_logprob=True, top_logprobs_num=k``)."""
        req = self.stream_controls.handle(sid)
        if req is None or not req.top_logprobs_num:
            return None
        return [[lp for lp, _ in top] for top in req.output_top_logprobs[start:]]

    def _prompt_ids(self, prompt: PromptInput) -> List[int]:
        return self.encode(prompt.text) if prompt.text is not None else self._check_ids(prompt.input_ids)

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
                 namespace: Optional[str] = None) -> Pending:
        params = parse_sampling_params(sampling_params, self.tokenizer, self.vocab_size)
        grammar = self.grammars.request_grammar(params)  # compiled here: a bad pattern fails this call
        if len(ids) >= self.context_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context length is {self.context_len}")
        params.max_new_tokens = min(params.max_new_tokens, self.context_len - len(ids))
        logprob_start = None
        if return_logprob and logprob_start_len is not None and logprob_start_len >= 0:
            if logprob_start_len >= len(ids):
                raise ValueError(f"logprob_start_len={logprob_start_len} is past the prompt ({len(ids)} tokens)")
            logprob_start = logprob_start_len
        stop_ids = set() if params.ignore_eos else set(self.eos_ids)
        stop_ids |= set(params.stop_token_ids or ())
        pending = Pending()
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

    def _eos_ids(self) -> frozenset:
        ids = set()
        gen_eos = getattr(getattr(self.hf_model, "generation_config", None), "eos_token_id", None)
        for value in (gen_eos, self.hf_model.config.eos_token_id, self.tokenizer.eos_token_id):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return frozenset(ids)
