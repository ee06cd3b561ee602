"""Compression of branch-private decode KV (R-KV and a CASK-style variant), radix sharing kept.

Long chains of thought fill the KV pool with tokens each branch alone will read. With
``EngineConfig(compression={...})`` a decoding request keeps only part of the KV of the
tokens it generated:

* **Which tokens are candidates.** Only the request's own decode tokens (row positions from
  its prompt length on), never the prompt, which is the exact, shareable prefix the radix
  tree holds. The newest ``buffer`` tokens are never candidates (R-KV's recent buffer).
* **When.** The target is ``max(ceil(budget * decoded), min_tokens)`` tokens of decode KV.
  Whenever the kept decode KV exceeds target + ``buffer``, the candidates are scored and the
  lowest dropped until target tokens remain (the buffer included), so the private KV never
  holds more than ``budget`` of the decoded tokens plus the buffer (plus one step) once
  ``budget * decoded`` passes ``min_tokens``.
* **Score (R-KV).** ``lam * importance - (1 - lam) * redundancy``. Importance: the
  attention mass the token's key received from decode queries so far (the engine adds
  every decode query's attention weights, averaged over heads, on every
  ``attention_layer_stride``-th layer), divided by the largest among the candidates.
  It is divided by the number of decode queries that came after the token (its age), so old
  and new tokens compete fairly (``importance="cumulative"``, H2O's accumulation). With
  ``importance="window"`` it is the mass received since the request's previous compression
  instead, the last ``buffer`` or so queries: R-KV's observation window, where a token
  counts for what the newest queries read. Redundancy: the mean cosine similarity of the token's key to the other candidates' keys
  (layer ``key_layer``, each KV head's keys normalised, similarities averaged over heads;
  ``redundancy_layers="all"``: averaged over every layer instead of one).
  One selection serves every layer and head (SGLang's pool is indexed per token), where
  R-KV selects per head.
* **CASK-style** (``method="cask"``): the ``core`` share of the budget with the highest
  importance is the protected core; the rest of the budget is scratch, chosen by the R-KV
  score, and every dropped scratch token is consolidated into its most similar kept
  scratch token (keys and values averaged, weighted by how many tokens each slot already
  stands for) instead of being discarded.
* **Recent window** (``method="recent"``, a baseline, not a method to use): keep the newest
  candidates only, ignoring attention and keys, as StreamingLLM's window (its sink tokens
  are the prompt, which is never dropped). The candidates come oldest first (the scheduler
  passes them in order of their original positions), so this keeps the last ``keep_count``.
  It tells whether R-KV's scoring does better than any cheap eviction at the same budget.
* **Attention only** (``method="attention"``, a baseline): keep the candidates with the
  highest importance, without the redundancy term (H2O's accumulated attention, as SnapKV
  and H2O select), so the worth of R-KV's redundancy term is measured on its own.

Kept tokens keep their positions (their keys were rotated when computed); the tokens
after them continue at their true positions (``ReqKV.dropped``). A compressed request
no longer has the KV of its tokens, so nothing it computed after its prompt is inserted
into the tree: no exact lookup can ever match compressed KV. Dropped slots go back to
the allocator at once.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from rksc_sgl.kv.compaction import compress

if TYPE_CHECKING:
    from rksc_sgl.kv.manager import KVCacheManager
    from rksc_sgl.kv.records import ReqKV

METHODS = ("rkv", "cask", "recent", "attention")
IMPORTANCE = ("cumulative", "window")
REDUNDANCY_LAYERS = ("one", "all")


@dataclasses.dataclass(frozen=True)
class CompressionConfig:
    """Settings of decode-KV compression (see the module docstring)."""

    method: str = "rkv"
    budget: float = 0.16
    buffer: int = 16
    min_tokens: int = 32
    lam: float = 0.1
    core: float = 0.5
    key_layer: Optional[int] = None  # None: the middle layer
    attention_layer_stride: int = 4
    importance: str = "cumulative"
    redundancy_layers: str = "one"

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("importance", IMPORTANCE),
                              ("redundancy_layers", REDUNDANCY_LAYERS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"compression {name} {getattr(self, name)!r}; choose one of {', '.join(choices)}")
        for name, low, high in (("budget", 0.0, 1.0), ("lam", 0.0, 1.0), ("core", 0.0, 1.0)):
            value = getattr(self, name)
            if not isinstance(value, numbers.Real) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"compression {name} must be a number in [{low:g}, {high:g}], got {value!r}")
        if self.budget <= 0:
            raise ValueError("compression budget must be > 0 (the share of decoded tokens whose KV is kept)")
        for name, low in (("buffer", 1), ("min_tokens", 1), ("attention_layer_stride", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"compression {name} must be an integer >= {low}, got {value!r}")
        if self.min_tokens < self.buffer:
            raise ValueError(f"compression min_tokens ({self.min_tokens}) must be >= buffer ({self.buffer}): "
                             "the kept decode KV includes the recent buffer")
        if self.key_layer is not None and (not isinstance(self.key_layer, int) or isinstance(self.key_layer, bool)
                                           or self.key_layer < 0):
            raise ValueError(f"compression key_layer must be an integer >= 0, got {self.key_layer!r}")

    def target(self, decoded: int) -> int:
        """Decode tokens whose KV is kept after compressing ``decoded`` tokens (buffer included)."""
        return max(math.ceil(self.budget * decoded - 1e-9), self.min_tokens)

    def needs_compression(self, kept: int, decoded: int) -> bool:
        return kept > self.target(decoded) + self.buffer

    def private_cap(self, max_new_tokens: int) -> int:
        """Most decode KV a request can hold at once (for admission)."""
        return min(max_new_tokens, self.target(max_new_tokens) + self.buffer + 1)


def compression_config(value) -> Optional[CompressionConfig]:
    """``EngineConfig.compression`` from None, a config or a mapping of its fields."""
    if value is None or isinstance(value, CompressionConfig):
        return value
    if isinstance(value, dict) or hasattr(value, "keys"):
        unknown = set(value) - {f.name for f in dataclasses.fields(CompressionConfig)}
        if unknown:
            raise ValueError(f"compression: unknown field(s) {', '.join(sorted(unknown))}")
        return CompressionConfig(**value)
    raise ValueError(f"compression must be a CompressionConfig or a mapping of its fields, got {type(value).__name__}")


@dataclasses.dataclass
class Plan:
    """What to do with the candidates: indices (into the candidates) to keep, and for
    CASK, ``merges``: (dropped index, kept index) pairs to consolidate."""

    keep: List[int]
    merges: List[Tuple[int, int]] = dataclasses.field(default_factory=list)


def redundancy(keys: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each token's key to the others'; ``keys`` (n, heads, dim),
    heads standing for (layer, head) pairs when several layers are stacked."""
    n = keys.shape[0]
    if n < 2:
        return torch.zeros(n)
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = torch.einsum("ihd,jhd->ij", unit, unit) / keys.shape[1]
    sim.fill_diagonal_(0.0)
    return sim.sum(dim=1) / (n - 1)


def plan(config: CompressionConfig, importance: torch.Tensor, keys: torch.Tensor, keep_count: int) -> Plan:
    """Choose ``keep_count`` of the candidates (their attention mass and keys), which come
    oldest first."""
    n = importance.shape[0]
    keep_count = max(0, min(keep_count, n))
    if keep_count >= n:
        return Plan(list(range(n)))
    if config.method == "recent":
        return Plan(list(range(n - keep_count, n)))
    if config.method == "attention":
        return Plan(sorted(int(i) for i in torch.topk(importance.float(), keep_count).indices))
    imp = importance.float().clamp(min=0)
    top = float(imp.max()) if n else 0.0
    imp = imp / top if top > 0 else imp
    red = redundancy(keys)
    score = config.lam * imp - (1.0 - config.lam) * red
    if config.method == "rkv":
        keep = torch.topk(score, keep_count).indices
        return Plan(sorted(int(i) for i in keep))
    core_count = min(keep_count, int(round(config.core * keep_count)))
    core = set(int(i) for i in torch.topk(imp, core_count).indices) if core_count else set()
    rest = [i for i in range(n) if i not in core]
    scratch_count = keep_count - len(core)
    if scratch_count and rest:
        rest_scores = score[rest]
        chosen = torch.topk(rest_scores, min(scratch_count, len(rest))).indices
        scratch = sorted(rest[int(i)] for i in chosen)
    else:
        scratch = []
    keep = sorted(core | set(scratch))
    merges = []
    if scratch:
        dropped = [i for i in rest if i not in set(scratch)]
        if dropped:
            unit = torch.nn.functional.normalize(keys.float(), dim=-1)
            sim = torch.einsum("ihd,jhd->ij", unit[dropped], unit[scratch]) / keys.shape[1]
            nearest = sim.argmax(dim=1)
            merges = [(d, scratch[int(j)]) for d, j in zip(dropped, nearest)]
    return Plan(keep, merges)


def compress_decode_kv(kv: "KVCacheManager", req: "ReqKV", prompt_len: int, cfg: CompressionConfig) -> int:
    """Compress one request's decode KV (row positions from ``prompt_len`` on, less the
    last ``buffer``) down to its budget when it is over budget plus buffer: importance
    from the attention mass each slot received, redundancy from its keys, then
    ``rksc_sgl.kv.compaction.compress``. Returns the number of tokens dropped or merged."""
    if req.alias is not None:
        return 0  # (an ASKS alias row keeps its own layout; it is not compressed)
    kept = req.kv_len - prompt_len
    decoded = kept + req.dropped
    if not cfg.needs_compression(kept, decoded):
        return 0
    start, end = prompt_len, req.kv_len - cfg.buffer
    slots = kv.row_slots(req)[start:end]
    # Original positions of the candidates: the ones kept by earlier compressions, then
    # the run after them (contiguous, shifted by what was dropped).
    kept_before = len(req.kept_origins)
    origins = req.kept_origins + [r + req.dropped for r in range(start + kept_before, end)]
    mass = kv.slot_attention[slots.to(kv.slot_attention.device)].float().cpu()
    if cfg.importance == "window":  # what the queries since the last compression read
        importance = mass - torch.tensor([req.attention_seen.get(s, 0.0) for s in slots.tolist()])
    else:  # all it received, per query since it was made
        age = torch.tensor([req.kv_len + req.dropped - o for o in origins], dtype=torch.float32)
        importance = mass / age.clamp(min=1.0)
    chosen = plan(cfg, importance, _candidate_keys(kv, cfg, slots), cfg.target(decoded) - cfg.buffer)
    req.kept_origins = [origins[i] for i in sorted(chosen.keep)]
    dropped = compress(kv, req, start, end, chosen.keep, chosen.merges)
    if cfg.importance == "window":
        now = kv.row_slots(req)[prompt_len:req.kv_len]
        seen = kv.slot_attention[now.to(kv.slot_attention.device)].float().cpu()
        req.attention_seen = dict(zip(now.tolist(), seen.tolist()))
    return dropped


def _candidate_keys(kv: "KVCacheManager", cfg: CompressionConfig, slots: torch.Tensor) -> torch.Tensor:
    """The candidates' keys the redundancy term compares: ``(n, heads, dim)`` of one
    layer, or of every layer stacked along the head axis."""
    num_layers = kv.layout.num_layers
    if cfg.redundancy_layers == "all":
        layers = range(num_layers)
    else:
        layers = [min(cfg.key_layer if cfg.key_layer is not None else num_layers // 2, num_layers - 1)]
    index = slots.to(kv.kv_pool.get_key_buffer(0).device)
    return torch.cat([kv.kv_pool.get_key_buffer(layer)[index].cpu() for layer in layers], dim=1)
