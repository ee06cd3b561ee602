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
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from rksc_sgl.kv.compaction import compress
from rksc_sgl.rksc.compression_config import (ATTENTION_METHODS, IMPORTANCE, METHODS,  # noqa: F401 (re-exported)
                                              REDUNDANCY_LAYERS, CompressionConfig, compression_config)

if TYPE_CHECKING:
    from rksc_sgl.kv.manager import KVCacheManager
    from rksc_sgl.kv.records import ReqKV


@dataclasses.dataclass
class Plan:
    """What to do with the candidates: indices (into the candidates) to keep, and for
    CASK, ``merges``: (dropped index, kept index) pairs to consolidate."""

    keep: List[int]
    merges: List[Tuple[int, int]] = dataclasses.field(default_factory=list)


def key_similarity(keys: torch.Tensor) -> torch.Tensor:
    """``(n, n)``: the cosine similarity of each pair of candidates' keys, averaged over
    heads, the diagonal 0; ``keys`` (n, heads, dim), heads standing for (layer, head) pairs
    when several layers are stacked. The one input of the redundancy term and of ``cask``'s
    merge targets (tensor-parallel ranks average their heads' matrices)."""
    unit = torch.nn.functional.normalize(keys.float(), dim=-1)
    sim = torch.einsum("ihd,jhd->ij", unit, unit) / keys.shape[1]
    sim.fill_diagonal_(0.0)
    return sim


def redundancy_of(similarity: torch.Tensor) -> torch.Tensor:
    """Each candidate's mean similarity to the others (:func:`key_similarity`'s matrix)."""
    n = similarity.shape[0]
    if n < 2:
        return torch.zeros(n, device=similarity.device)
    return similarity.sum(dim=1) / (n - 1)


def redundancy(keys: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity of each token's key to the others'; ``keys`` (n, heads, dim)."""
    return redundancy_of(key_similarity(keys))


def importance_of(config: CompressionConfig, mass: torch.Tensor, *, age: torch.Tensor = None,
                  seen: torch.Tensor = None) -> torch.Tensor:
    """The candidates' importance from the attention ``mass`` their slots received: per
    query since each was made (``age``, cumulative), or the mass received since the
    request's previous compression (``seen``: what each had then, window). Same device
    as ``mass``; nothing read back."""
    if config.importance == "window":
        return mass - seen
    return mass / age.clamp(min=1.0)


def _scores(config: CompressionConfig, importance: torch.Tensor,
            similarity: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """R-KV's score and the normalised importance it is made of (device operations only)."""
    imp = importance.float().clamp(min=0)
    top = imp.max()
    imp = torch.where(top > 0, imp / top, imp)
    return config.lam * imp - (1.0 - config.lam) * redundancy_of(similarity), imp


def _similarity(keys: Optional[torch.Tensor], similarity: Optional[torch.Tensor]) -> torch.Tensor:
    return similarity if similarity is not None else key_similarity(keys)


def select_keep(config: CompressionConfig, importance: torch.Tensor, keys: Optional[torch.Tensor],
                keep_count: int, *, similarity: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The ``keep_count`` candidates to keep (indices, ascending, on ``importance``'s device)
    by the ``rkv``, ``recent`` and ``attention`` rules; the candidates come oldest first.
    ``rkv`` compares ``keys``, or takes their :func:`key_similarity` as ``similarity``.
    Device operations only (``topk``, no read back), so SGLang's runtime selects with it
    inside its scheduler as the engine does (through :func:`plan`)."""
    n = importance.shape[0]
    keep_count = max(0, min(keep_count, n))
    device = importance.device
    if keep_count >= n:
        return torch.arange(n, device=device)
    if config.method == "recent":
        return torch.arange(n - keep_count, n, device=device)
    if config.method == "attention":
        return torch.sort(torch.topk(importance.float(), keep_count).indices).values
    if config.method == "rkv":
        score, _ = _scores(config, importance, _similarity(keys, similarity))
        return torch.sort(torch.topk(score, keep_count).indices).values
    raise ValueError(f"select_keep: method {config.method!r} merges tokens; use plan()")


def cask_select(config: CompressionConfig, importance: torch.Tensor, keys: Optional[torch.Tensor],
                keep_count: int, *, similarity: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``method="cask"``'s decisions (the module doc's rule) as index tensors on
    ``importance``'s device: ``(keep, scratch, dropped, into)``, ascending kept indices, the
    kept scratch ones, the dropped ones that merge and, for each, the kept index it merges
    into (``dropped`` is empty when no scratch is kept). Device operations only: every size
    is known from ``keep_count`` and ``config.core``, nothing is read back."""
    n = importance.shape[0]
    keep_count = max(0, min(keep_count, n))
    device = importance.device
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    if keep_count >= n:
        return torch.arange(n, device=device), empty, empty, empty
    sim = _similarity(keys, similarity)
    score, imp = _scores(config, importance, sim)
    core_count = min(keep_count, int(round(config.core * keep_count)))
    scratch_count = keep_count - core_count
    kept = torch.zeros(n, dtype=torch.int32, device=device)
    if core_count:
        kept[torch.topk(imp, core_count).indices] = 1
    scratch = empty
    if scratch_count:  # the R-KV score's best among the others (ascending, as plan's list)
        rest = torch.sort(kept, stable=True).indices[:n - core_count]
        chosen = torch.topk(score[rest], scratch_count).indices
        scratch = torch.sort(rest[chosen]).values
        kept[scratch] = 1
    order = torch.sort(1 - kept, stable=True).indices  # kept first, each part ascending
    keep, dropped = order[:keep_count], order[keep_count:]
    if not scratch_count:
        return keep, scratch, empty, empty
    return keep, scratch, dropped, scratch[sim.index_select(0, dropped).index_select(1, scratch).argmax(dim=1)]


def plan(config: CompressionConfig, importance: torch.Tensor, keys: torch.Tensor, keep_count: int) -> Plan:
    """Choose ``keep_count`` of the candidates (their attention mass and keys), which come
    oldest first: :func:`select_keep`'s, or for ``cask`` :func:`cask_select`'s decisions, as lists."""
    if config.method != "cask":
        return Plan(select_keep(config, importance, keys, keep_count).tolist())
    keep, _, dropped, into = cask_select(config, importance, keys, keep_count)
    return Plan(keep.tolist(), list(zip(dropped.tolist(), into.tolist())))


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
        importance = importance_of(cfg, mass, seen=torch.tensor([req.attention_seen.get(s, 0.0)
                                                                  for s in slots.tolist()]))
    else:  # all it received, per query since it was made
        age = torch.tensor([req.kv_len + req.dropped - o for o in origins], dtype=torch.float32)
        importance = importance_of(cfg, mass, age=age)
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
    index = slots.to(kv.kv_pool.get_key_buffer(0).device)
    return torch.cat([kv.kv_pool.get_key_buffer(layer)[index].cpu() for layer in cfg.key_layers(kv.layout.num_layers)],
                     dim=1)
