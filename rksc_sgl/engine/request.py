"""What the scheduler tracks: one generation request (:class:`Request`) and the engine's
counters (:class:`EngineStats`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from rksc_sgl.engine.grammar import RequestGrammar
from rksc_sgl.kv.records import ReqKV
from rksc_sgl.rksc.compression import CompressionConfig


@dataclasses.dataclass
class EngineStats:
    """Counters over the engine's lifetime; subtract two snapshots for one program.

    ``cached_tokens``: prompt tokens served by exact prefix matches. ASKS (``cache="rksc-tree"``):
    ``semantic_tokens`` prompt tokens served from a donor's KV (an identical token of a
    similar span, read in place or copied to a shifted position), ``recomputed_tokens``
    span tokens computed instead (also in ``prefill_tokens``),
    ``key_tokens`` tokens run through the key layer to look donors up (the key cost).
    """

    requests: int = 0
    prefill_tokens: int = 0
    cached_tokens: int = 0
    semantic_tokens: int = 0
    recomputed_tokens: int = 0
    key_tokens: int = 0
    decode_tokens: int = 0
    forward_passes: int = 0
    dropped_tokens: int = 0  # decode tokens whose KV compression dropped or consolidated
    peak_kv_tokens: int = 0
    busy_time_s: float = 0.0

    def snapshot(self) -> "EngineStats":
        return dataclasses.replace(self)

    def since(self, earlier: "EngineStats") -> "EngineStats":
        """Counters accumulated after ``earlier``. The peak is this snapshot's: the peak of
        the window opened by ``Engine.stats(reset_peak=True)``."""
        out = EngineStats()
        for f in dataclasses.fields(self):
            now, before = getattr(self, f.name), getattr(earlier, f.name)
            setattr(out, f.name, now if f.name == "peak_kv_tokens" else now - before)
        return out

    def as_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Request:
    """One generation request as the scheduler sees it."""

    rid: str
    input_ids: List[int]
    params: object  # sglang SamplingParams, validated and normalized
    stop_ids: frozenset
    logprob_start: Optional[int] = None  # first prompt position whose logprob is wanted
    top_logprobs_num: int = 0
    want_logprobs: bool = False
    on_event: Optional[Callable] = None  # called from the scheduler thread
    grammar: Optional[RequestGrammar] = None  # this request's own matcher (constrained decoding)
    generator: Optional[torch.Generator] = None  # its own RNG (sampling_seed); None: the shared one
    namespace: Optional[str] = None  # tree namespace (SGLang's ``extra_key``): matches only its own paths
    compression: Optional[CompressionConfig] = None  # compress its decode KV (rksc_sgl/rksc/compression.py)
    forced_ids: Optional[Sequence[int]] = None  # teacher forcing: emits these tokens, whatever it would sample
    observe: Optional[Callable] = None  # observe(req, logprobs) before each token is chosen (replays)
    created: float = dataclasses.field(default_factory=time.perf_counter)
    # filled in by the scheduler
    kv: Optional[ReqKV] = None
    cached_tokens: int = 0
    semantic_tokens: int = 0  # prompt tokens read from a semantic alias (ASKS)
    output_ids: List[int] = dataclasses.field(default_factory=list)
    output_logprobs: List[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: List[list] = dataclasses.field(default_factory=list)
    input_logprobs: List[Optional[float]] = dataclasses.field(default_factory=list)
    input_top_logprobs: List[list] = dataclasses.field(default_factory=list)
    finish_reason: Optional[dict] = None
    cancelled: bool = False
    cancel_message: str = "cancelled"  # the abort message its finish reason carries
    cancel_caches_output: bool = True  # cancelled: its decode KV goes into the tree (False: freed)

    @property
    def max_new_tokens(self) -> int:
        return self.params.max_new_tokens

    @property
    def decode_kv_cap(self) -> int:
        """The most decode KV it can hold at once (less than ``max_new_tokens`` when compressed)."""
        if self.compression is None:
            return self.max_new_tokens
        return self.compression.private_cap(self.max_new_tokens)

    def remaining_reservation(self) -> int:
        """Slots this request may still allocate (upper bound)."""
        if self.kv is None:
            return len(self.input_ids) + self.decode_kv_cap
        held = max(self.kv.kv_len - len(self.input_ids), 0)
        return max(self.decode_kv_cap - held, 0)
