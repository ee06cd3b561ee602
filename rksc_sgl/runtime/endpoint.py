"""``--endpoint URL``: the programs' backend when they run against a running server.

:class:`RuntimeBackend` is SGLang's own ``sgl.RuntimeEndpoint`` (so a program runs
unchanged, ``rksc_sgl.verify`` takes its ``select`` path) that also counts what the
server's answers say about each request (``meta_info``: prompt, cached and completion
tokens), and answers the few questions the program runner asks an engine: ``config``
(model, cache), ``stats()`` and ``check_integrity()``. It works with any SGLang server
(``rksc-sgl launch-server``, ``python -m sglang.launch_server``, ``rksc-sgl serve``) and
with SGLang's router in front of several (``sglang-router``):

- ``--dp-size N``: the counters and the integrity check cover every scheduler. SGLang's DP
  controller hands requests to ranks in turn, which would split a fork's branches over N
  trees; the backend sends each request with ``routed_dp_rank``, one rank per program (its
  forks included), programs taking ranks in turn from a random one (``pin_programs=False``:
  SGLang's choice).
- A router: nothing is read from ``/server_info`` until asked (the router has none); then
  the servers behind it answer (``worker_urls``, or those the router lists), and until
  one can, ``config`` says the cache is ``unknown`` and why. Branch stop's abort goes to
  every server (the router has no ``/abort_request``; see :mod:`rksc_sgl.runtime.client`).
  Which server runs a request is the router's choice: its ``cache_aware`` policy (the
  default) sends a program's branches where its prefix went; ``round_robin`` splits them.
  A worker with ``--dp-size N`` behind a router picks a rank for each request in turn.

A gen that asks for top-k log-probabilities (``return_logprob=True, top_logprobs_num=k``) is
posted streamed: SGLang's plain ``/generate`` returns them only when the request ends, and a
vote's token rule (``deepconf``) reads them while the branch decodes
(:meth:`RuntimeBackend.stream_top_logprobs`). The gen still returns the text and
``meta_info`` a plain post would (the last chunk's: SGLang's stream chunks carry every
log-probability so far, unless the server runs with ``--incremental-streaming-output``, which
this backend does not support).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import random
import threading
import uuid
from typing import Any, Dict, List, Optional, Sequence

import requests

from sglang.lang.backend.runtime_endpoint import RuntimeEndpoint

from rksc_sgl.rksc.branch_stop import BRANCH_RID_PREFIX, StreamControls, stopped_meta_info
from rksc_sgl.model.chat import server_chat_template
from rksc_sgl.runtime.client import RuntimeClient
from rksc_sgl.runtime.plugin import BACKEND_NAME

__all__ = ["RuntimeBackend", "RuntimeInfo", "RuntimeStats", "UNKNOWN", "place_of"]

PINNED_PROGRAMS = 1024
"""Programs whose DP rank a :class:`RuntimeBackend` remembers (the most recent ones)."""

UNKNOWN = "unknown"
"""``RuntimeInfo.cache`` / ``eviction_policy`` while no server has said (``RuntimeInfo.unknown`` says why)."""


@dataclasses.dataclass
class RuntimeStats:
    """Counters from the server's per-request ``meta_info`` (``select``'s scoring calls
    included) and, on the ``rksc`` backend, from its ASKS counters (``/server_info``).

    ``cached_tokens`` is SGLang's: every prompt token whose KV the request did not compute,
    so with ASKS it includes the donor's (``semantic_tokens``)."""

    requests: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    decode_tokens: int = 0
    semantic_tokens: int = 0
    recomputed_tokens: int = 0
    key_tokens: int = 0
    places: Dict[str, Dict[str, int]] = dataclasses.field(default_factory=dict)
    """Per scheduler that answered (:func:`place_of`): ``requests``, ``prompt_tokens`` and
    ``cached_tokens`` (SGLang's, ASKS donors' tokens included)."""

    def since(self, earlier: "RuntimeStats") -> "RuntimeStats":
        counters = {f.name: getattr(self, f.name) - getattr(earlier, f.name)
                    for f in dataclasses.fields(self) if f.name != "places"}
        places = {}
        for place, now in self.places.items():
            before = earlier.places.get(place, {})
            delta = {key: value - before.get(key, 0) for key, value in now.items()}
            if any(delta.values()):
                places[place] = delta
        return RuntimeStats(**counters, places=places)

    def as_dict(self) -> Dict[str, Any]:
        """The counters, in the engine's names (``cached_tokens``: exact hits only); the
        runtime reports no KV peak per run (``None``)."""
        return {**dataclasses.asdict(self), "cached_tokens": self.cached_tokens - self.semantic_tokens,
                "peak_kv_tokens": None}


def place_of(meta_info: Dict[str, Any]) -> str:
    """Which scheduler answered a request, from its ``meta_info``: the server's
    ``--weight-version`` when it is not SGLang's ``default`` (``bench --scale-out workers:N``
    tags worker i ``w<i>``: the router does not say which worker it chose) and the DP rank
    (``r<rank>``), e.g. ``w1.r0``; ``server`` when the answer says neither."""
    parts = []
    version = meta_info.get("weight_version")
    if version not in (None, "", "default"):
        parts.append(str(version))
    rank = meta_info.get("dp_rank")
    if rank is not None:
        parts.append(f"r{rank}")
    return ".".join(parts) or "server"


@dataclasses.dataclass(frozen=True)
class RuntimeInfo:
    """What the server says it runs (``/server_info``; every server's, behind a router)."""

    model: str
    cache: str
    """``none`` (radix cache disabled), the ``--radix-cache-backend`` name, ``default``,
    ``unknown`` (no server answered yet) or ``mixed: a, b`` (servers differ)."""
    eviction_policy: str
    schedulers: int = 1
    """Schedulers (trees) behind the URL: DP ranks, summed over a router's servers."""
    dp_size: int = 1
    """The server's ``--dp-size`` (1 behind a router: the router picks servers, not ranks)."""
    unknown: Optional[str] = None
    """Why ``cache`` is ``unknown``."""

    @property
    def rksc_tree(self) -> bool:
        """The server's tree is the RKSC cache (it reports ASKS counters and an idle check)."""
        return self.cache == BACKEND_NAME


class _CurrentStream(threading.local):
    """The frontend stream whose gen this thread is posting (``None`` between gens)."""

    sid: Optional[str] = None


class RuntimeBackend(RuntimeEndpoint):
    """``sgl.RuntimeEndpoint`` plus request counting, ``config``, ``stats`` and ``check_integrity``.

    Unless ``chat_template_name`` is given, chat prompts use the model's own template
    (:func:`rksc_sgl.model.chat.server_chat_template`), so a program prompts the runtime exactly
    as it prompts the embedded engine."""

    def __init__(self, base_url: str, api_key: Optional[str] = None, chat_template_name: Optional[str] = None,
                 worker_urls: Optional[Sequence[str]] = None, pin_programs: bool = True, **kwargs: Any):
        super().__init__(base_url, api_key=api_key, chat_template_name=chat_template_name, **kwargs)
        if not chat_template_name:  # the model's own template, as the embedded engine prompts
            self.chat_template = server_chat_template(self.model_info)
        self.client = RuntimeClient(base_url, worker_urls=worker_urls)
        self.pin_programs = pin_programs
        self._config: Optional[RuntimeInfo] = None
        self._program_ranks: "collections.OrderedDict[int, tuple]" = collections.OrderedDict()
        self._next_rank = itertools.count(random.randrange(1 << 16))  # clients start apart
        # Branch stop (rksc_sgl.vote): a frontend gen's request id, so SGLang's abort API can end it.
        self.stream_controls = StreamControls(abort=lambda rid, reason: self.client.abort(rid=rid))
        self._generating = _CurrentStream()
        self._lock = threading.Lock()
        self._stats = RuntimeStats()
        self._top_logprobs: Dict[str, list] = {}  # sid -> its streamed gen's top-k log-probabilities so far

    # -- what runs behind the URL -------------------------------------------------------------
    @property
    def config(self) -> RuntimeInfo:
        """What the server(s) run, read on first use and kept once known (``unknown`` is asked
        again next time: a router may have no server yet)."""
        if self._config is None:
            info = self._read_config()
            if info.cache != UNKNOWN:
                self._config = info
            return info
        return self._config

    def _read_config(self) -> RuntimeInfo:
        model = self.model_info["model_path"]
        try:
            infos = self.client.server_infos()
        except (requests.RequestException, KeyError, ValueError) as exc:
            return RuntimeInfo(model=model, cache=UNKNOWN, eviction_policy=UNKNOWN, schedulers=0,
                               unknown=f"no server behind {self.base_url} answered /server_info: {exc}")
        states = [state for _, info in infos for state in info["internal_states"]]
        if not states:
            return RuntimeInfo(model=model, cache=UNKNOWN, eviction_policy=UNKNOWN, schedulers=0,
                               unknown=f"no server behind {self.base_url} (a router without workers?)")
        caches = {"none" if s.get("disable_radix_cache") else (s.get("radix_cache_backend") or "default")
                  for s in states}
        policies = {str(s.get("radix_eviction_policy")) for s in states}
        dp_size = int(infos[0][1].get("dp_size") or 1) if not self.client.is_router() else 1
        return RuntimeInfo(model=model, cache=_one(caches), eviction_policy=_one(policies), schedulers=len(states),
                           dp_size=dp_size)

    def _program_rank(self, s) -> Optional[int]:
        """The DP rank of ``s``'s program (its forks share ``arguments``), or ``None`` to let
        SGLang choose (one rank, a router, ``pin_programs=False``)."""
        if not self.pin_programs or self._dp_size() <= 1:
            return None
        arguments = s.arguments  # the dict every fork of one program run shares
        with self._lock:
            entry = self._program_ranks.get(id(arguments))
            if entry is None:
                # The dict is kept (the last PINNED_PROGRAMS of them), so its id names no other
                # program while it has a rank; a program forgotten since takes the next rank.
                entry = self._program_ranks[id(arguments)] = (arguments, next(self._next_rank) % self._dp_size())
                while len(self._program_ranks) > PINNED_PROGRAMS:
                    self._program_ranks.popitem(last=False)
            else:
                self._program_ranks.move_to_end(id(arguments))
        return entry[1]

    def _dp_size(self) -> int:
        if self._config is not None:
            return self._config.dp_size
        try:
            if self.client.is_router():
                return 1
        except requests.RequestException:
            return 1
        return self.config.dp_size

    # -- counting ------------------------------------------------------------------------
    def _count(self, meta_info: Dict[str, Any]) -> None:
        prompt, cached = meta_info.get("prompt_tokens", 0), meta_info.get("cached_tokens", 0)
        with self._lock:
            self._stats.requests += 1
            self._stats.prefill_tokens += prompt - cached
            self._stats.cached_tokens += cached
            self._stats.decode_tokens += meta_info.get("completion_tokens", 0)
            place = self._stats.places.setdefault(place_of(meta_info), {"requests": 0, "prompt_tokens": 0,
                                                                        "cached_tokens": 0})
            place["requests"] += 1
            place["prompt_tokens"] += prompt
            place["cached_tokens"] += cached

    def generate(self, s, sampling_params):
        refused = self._refused(s)
        if refused is not None:
            return "", refused
        if getattr(sampling_params, "return_logprob", None) and getattr(sampling_params, "top_logprobs_num", None):
            return self._generate_streamed(s, sampling_params)
        with self._posting(s):
            text, meta_info = super().generate(s, sampling_params)
        self._count(meta_info)
        return text, meta_info

    def generate_stream(self, s, sampling_params):
        refused = self._refused(s)
        if refused is not None:
            yield "", refused
            return
        meta_info = None
        with self._posting(s):
            for chunk, meta_info in super().generate_stream(s, sampling_params):
                self._generating.sid = None  # posted: a later request of this thread is not the gen
                yield chunk, meta_info
        if meta_info:
            self._count(meta_info)

    def _generate_streamed(self, s, sampling_params):
        """A gen that asks for top-k log-probabilities, posted streamed: each chunk's list (all
        of them so far) is kept for :meth:`stream_top_logprobs` while the request runs; returns
        the whole text and the last chunk's ``meta_info``, as a plain post would."""
        text, meta_info = "", None
        try:
            with self._posting(s):
                for chunk, meta_info in RuntimeEndpoint.generate_stream(self, s, sampling_params):
                    self._generating.sid = None  # posted: a later request of this thread is not the gen
                    text += chunk
                    tops = meta_info.get("output_top_logprobs")
                    if tops is not None:
                        with self._lock:
                            self._top_logprobs[s.sid] = tops
        finally:
            with self._lock:
                self._top_logprobs.pop(s.sid, None)
        if meta_info is None:
            raise RuntimeError(f"the server's stream for {s.sid} ended without an answer")
        self._count(meta_info)
        return text, meta_info

    def stream_top_logprobs(self, sid: str, start: int = 0) -> Optional[List[List[float]]]:
        """The top-k log-probabilities of each token the stream's gen in flight has decoded, from
        token ``start`` on, as the server has streamed them so far; ``None`` without such a gen
        (a vote's token rule reads them, ``rksc_sgl.rksc.branch_stop.TokenReader``)."""
        with self._lock:
            tops = self._top_logprobs.get(sid)
        if tops is None:
            return None
        return [[float(entry[0]) for entry in step] for step in tops[start:]]

    def _refused(self, s) -> Optional[Dict[str, Any]]:
        """The ``meta_info`` of a gen a stopped stream does not post (its seed is dropped), or ``None``."""
        reason = self.stream_controls.reason(s.sid)
        if reason is None:
            return None
        self.stream_controls.take_seed(s.sid)
        return stopped_meta_info(0, reason)

    @contextlib.contextmanager
    def _posting(self, s):
        """While ``RuntimeEndpoint`` posts the stream's gen: :meth:`_add_images` names it."""
        self._generating.sid = s.sid
        try:
            yield
        finally:
            self._generating.sid = None
            self.stream_controls.finished(s.sid)

    def _add_images(self, s, data):
        """``RuntimeEndpoint``'s last step before it posts a ``/generate``: a frontend gen
        gets its own request id here (``rksc-branch-<sid>-...``), recorded so that
        :meth:`stop_stream` can abort it, and the seed :meth:`seed_stream` gave it."""
        super()._add_images(s, data)
        rank = self._program_rank(s)
        if rank is not None and "routed_dp_rank" not in data:
            data["routed_dp_rank"] = rank
        if self._generating.sid == s.sid and "rid" not in data:
            data["rid"] = f"{BRANCH_RID_PREFIX}{s.sid}-{uuid.uuid4().hex[:12]}"
            seed = self.stream_controls.take_seed(s.sid)
            if seed is not None:
                data["sampling_params"]["sampling_seed"] = seed
            self.stream_controls.start(s.sid, data["rid"])

    # -- branch stop (rksc_sgl.vote) --------------------------------------------------------
    def stop_stream(self, sid: str, reason: str) -> None:
        """Abort the stream's request in flight through SGLang's ``/abort_request`` and
        refuse its next until :meth:`resume_stream`. On ``--radix-cache-backend rksc`` the
        aborted request caches only its prompt; SGLang's stock tree caches what it decoded
        too, as for any abort (exact KV either way)."""
        self.stream_controls.stop(sid, reason)

    def resume_stream(self, sid: str) -> None:
        self.stream_controls.resume(sid)

    def seed_stream(self, sid: str, seed: int) -> None:
        """The stream's next gen carries ``sampling_seed=seed`` (SGLang honours it on a server
        started with ``--seeded-sampling on``, or with ``--enable-deterministic-inference``)."""
        self.stream_controls.seed(sid, seed)

    def commit_lazy_operations(self, s):
        """``fork``'s prefill-only request for the text so far (``RuntimeEndpoint``'s, whose
        answer it drops), counted like any other: its prompt tokens are prefill work too."""
        self._prefill_only(s)

    def fill_image(self, s):
        self._prefill_only(s)

    def _prefill_only(self, s) -> None:
        from sglang.utils import http_request

        data = {"text": s.text_, "sampling_params": {"max_new_tokens": 0}}
        self._add_images(s, data)
        res = http_request(self.base_url + "/generate", json=data, api_key=self.api_key, verify=self.verify)
        self._assert_success(res)
        self._count(res.json()["meta_info"])

    def _generate_http_request(self, s, data):
        batch = _batch_key(data)
        if batch is not None and self.client.is_router():
            # sglang-router 0.3.2 refuses a batch /generate ("text: invalid type: sequence,
            # expected a string"), which select's scoring posts: one request per item instead.
            return [self._generate_http_request(s, {**copy.deepcopy(data), batch: item}) for item in data[batch]]
        obj = super()._generate_http_request(s, data)
        for item in obj if isinstance(obj, list) else [obj]:
            self._count(item["meta_info"])
        return obj

    # -- what the program runner asks ------------------------------------------------------
    def stats(self, reset_peak: bool = False) -> RuntimeStats:
        with self._lock:
            stats = dataclasses.replace(self._stats, places={k: dict(v) for k, v in self._stats.places.items()})
        if self.config.rksc_tree:  # the trees' ASKS counters, every scheduler's
            caches = [(state or {}).get("cache") or {} for state in self.client.rksc_states()]
            stats.semantic_tokens = sum(c.get("semantic_hit_tokens", 0) for c in caches)
            stats.recomputed_tokens = sum(c.get("recomputed_tokens", 0) for c in caches)
            stats.key_tokens = sum(c.get("key_tokens", 0) for c in caches)
        return stats

    def tree_stats(self) -> list:
        """Each scheduler's RKSC tree counters (``cache`` of its ``rksc`` entry; ``None`` where
        the tree is not RKSC's), in :meth:`RuntimeClient.scheduler_states` order."""
        return [(state or {}).get("cache") for state in self.client.rksc_states()]

    def flush_cache(self) -> bool:
        """Empty the server's tree (SGLang refuses while requests run: then ``False``)."""
        try:
            self.client.flush_cache()
        except Exception:
            return False
        return True

    def check_integrity(self) -> None:
        """The server(s) are healthy and, with the ``rksc`` tree, the idle integrity check of every
        scheduler passes (each DP rank, each server behind a router)."""
        if not self.client.healthy():
            raise RuntimeError(f"server {self.base_url} is not healthy")
        if self.config.rksc_tree:
            report = self.client.idle_integrity()
            if report["ok"] is False:
                raise RuntimeError(f"rksc tree integrity check failed: {report['problems']}")

    def shutdown(self) -> None:
        """Nothing to end: the server is not this process's."""


def _batch_key(data: Dict[str, Any]) -> Optional[str]:
    """``text`` or ``input_ids`` when a ``/generate`` body is a batch (a list of prompts), else ``None``."""
    if isinstance(data.get("text"), list):
        return "text"
    ids = data.get("input_ids")
    if isinstance(ids, list) and ids and isinstance(ids[0], list):
        return "input_ids"
    return None


def _one(values: set) -> str:
    """The value every server gave, or ``mixed: ...``."""
    return next(iter(values)) if len(values) == 1 else "mixed: " + ", ".join(sorted(values))
