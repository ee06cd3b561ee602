"""``forks.join(mode="concate_and_append")`` by KV concatenation (parallel encoding).

SGLang's interpreter joins this way when the backend says ``support_concate_and_append``:
it commits every branch (``commit_lazy_operations``), appends the branch texts to the
parent's text, and calls ``backend.concatenate_and_append(branch sids, parent sid)``.
The engine then builds the KV of ``prefix + branch 1 + branch 2 + ...`` from the branches'
cached KV (``concatenate``) instead of prefilling the branch texts again,
and the parent's later requests read it.

What is exact and what is approximate:

- the prefix and the first branch: exact (copied KV, the same a plain prefill computes);
- branch i > 1: its keys are rotated to their new positions (exact for the rotary
  embedding), but its tokens attended only to the prefix and to themselves, never to the
  branches before them, so from layer 1 on their KV differs from a plain prefill's of the
  joined text. What the parent generates after the join is therefore close to, not equal
  to, what a plain prefill gives: the parallel encoding trade-off.

That approximate KV lives under its own tree namespace (SGLang's ``extra_key``): only the
parent program's requests, which carry the namespace, match it; a plain lookup of the same
tokens never does. The tree evicts it like any other node.

Token boundaries: the joined token sequence is the prefix's tokens followed by each
branch's own tokens (as its requests tokenized them). A branch whose tokenization does
not start with the prefix's tokens (a token merged across the fork point), a branch whose
KV is no longer cached, or a parent that is itself a joined context, is joined by text
instead: the parent's next request then prefills the joined text exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import threading
import warnings
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from rksc_sgl.gpu_stack import explain_missing_sgl_kernel
from rksc_sgl.kv.records import radix_key

with warnings.catch_warnings(), explain_missing_sgl_kernel():
    warnings.simplefilter("ignore")
    from sglang.srt.mem_cache.base_prefix_cache import InsertParams

if TYPE_CHECKING:
    from rksc_sgl.kv.manager import KVCacheManager


@dataclasses.dataclass(frozen=True)
class JoinedContext:
    """The parent's text right after the join, its token ids and the KV namespace."""

    text: str
    token_ids: Tuple[int, ...]
    namespace: str


def join_namespace(prefix_ids: Sequence[int], segments: Sequence[Sequence[int]]) -> str:
    """A namespace that names the tokens and the segment boundaries: the same join gives
    the same KV, so it may be shared; a different split of the same tokens may not."""
    digest = hashlib.sha1(repr((tuple(prefix_ids), tuple(tuple(s) for s in segments))).encode()).hexdigest()
    return f"rksc-join:{digest[:20]}"


def joined_tokens(prefix_ids: Sequence[int], segments: Sequence[Sequence[int]]) -> List[int]:
    """The token sequence of a join: the prefix, then every segment in order."""
    return list(prefix_ids) + [t for seg in segments for t in seg]


def split_segments(encode: Callable[[str], List[int]], prefix_text: str,
                   branch_texts: Sequence[str]) -> Optional[Tuple[List[int], List[List[int]]]]:
    """(prefix ids, one id list per branch), or None when a branch's tokens do not start
    with the prefix's (then only a text join is right)."""
    prefix_ids = encode(prefix_text) if prefix_text else []
    segments = []
    for text in branch_texts:
        if not text:
            continue
        ids = encode(prefix_text + text)
        if ids[: len(prefix_ids)] != prefix_ids or len(ids) == len(prefix_ids):
            return None
        segments.append(ids[len(prefix_ids) :])
    return prefix_ids, segments


def concatenate(kv: "KVCacheManager", prefix_ids: List[int], segments: List[List[int]], rotate_keys: Callable,
                namespace: str) -> bool:
    """Build the KV of ``prefix + segments[0] + segments[1] + ...`` from cached KV.

    Each ``prefix + segment`` must be cached exactly (the branches of a fork, committed
    before the join). Their KV is copied into new slots, laid out one segment after
    the other, and inserted into the tree under ``namespace`` only, so no plain lookup
    can ever return it. The prefix and the first segment are copied as they are (their
    KV is exactly a plain prefill's); every later segment's keys are rotated by its new
    offset (``rotate_keys(keys, delta)``), so positions are right, but its tokens never
    attended to the segments before it: that part is approximate (parallel encoding).

    Returns False (nothing changed) when a branch's KV is no longer cached.
    """
    tokens = joined_tokens(prefix_ids, segments)
    if len(kv.match(tokens, len(tokens), namespace)[0]) == len(tokens):
        return True  # built before (the same join ran again)
    n_prefix = len(prefix_ids)
    locks, sources, deltas = [], [], []
    try:
        offset = 0
        for i, seg in enumerate(segments):
            ids = list(prefix_ids) + list(seg)
            slots, node = kv.match(ids, len(ids))
            if len(slots) < len(ids):
                return False
            locks.append(kv.tree.lock(node))
            if i == 0:
                sources.append(slots[:n_prefix])
                deltas.append(0)
            sources.append(slots[n_prefix:])
            deltas.append(offset)
            offset += len(seg)
        src = torch.cat(sources).to(torch.int64)
        dst = kv.alloc(len(tokens))  # may evict, but never the locked branches
        pos = 0
        for part, delta in zip(sources, deltas):
            kv.copy_kv(src[pos : pos + len(part)], dst[pos : pos + len(part)], delta, rotate_keys)
            pos += len(part)
        if kv.slot_attention is not None:
            kv.slot_attention[dst] = kv.slot_attention[src]
        slot_features = kv.slot_features
        if slot_features is not None:  # (approximate for later segments, like their KV)
            slot_features[dst.to(slot_features.device)] = slot_features[src.to(slot_features.device)]
        result = kv.tree.insert(InsertParams(key=radix_key(tokens, namespace), value=dst.clone()))
        kv.allocator.free(dst[: result.prefix_len])  # the namespace held that part already
        return True
    finally:
        for lock in locks:
            kv.tree.unlock(lock)


class JoinRegistry:
    """What the engine remembers per frontend executor (``StreamExecutor.sid``).

    ``branch``: a forked executor's text before and after its fork point, recorded when it
    commits (the join commits every branch first). ``context``: a joined parent's
    :class:`JoinedContext`. Entries go when their executor ends (after its worker thread
    has drained: ``end()`` is called while queued work may still run); ``max_entries``
    bounds what a program that never ends can leave behind.
    """

    def __init__(self, max_entries: int = 256):
        self.max_entries = max_entries
        self._lock = threading.Lock()
        self._branches: "collections.OrderedDict[str, Tuple[str, str]]" = collections.OrderedDict()
        self._contexts: "collections.OrderedDict[str, JoinedContext]" = collections.OrderedDict()
        self._ending: Dict[str, threading.Thread] = {}

    def record_branch(self, sid: str, prefix_text: str, branch_text: str) -> None:
        with self._lock:
            self._put(self._branches, sid, (prefix_text, branch_text))

    def branch(self, sid: str) -> Optional[Tuple[str, str]]:
        with self._lock:
            return self._branches.get(sid)

    def set_context(self, sid: str, context: JoinedContext) -> None:
        with self._lock:
            self._put(self._contexts, sid, context)

    def context(self, sid: str) -> Optional[JoinedContext]:
        with self._lock:
            self._sweep()
            return self._contexts.get(sid)

    def end(self, sid: str, worker: Optional[threading.Thread]) -> None:
        """The executor ended; forget it once ``worker`` (its thread, if any) is done."""
        with self._lock:
            if worker is not None and worker.is_alive() and sid in self._contexts:
                self._ending[sid] = worker
            else:
                self._drop(sid)
            self._sweep()

    def __len__(self) -> int:
        with self._lock:
            self._sweep()
            return len(self._branches) + len(self._contexts)

    def _put(self, table: "collections.OrderedDict", sid: str, value) -> None:
        table[sid] = value
        table.move_to_end(sid)
        while len(table) > self.max_entries:
            table.popitem(last=False)

    def _sweep(self) -> None:
        for sid in [s for s, worker in self._ending.items() if not worker.is_alive()]:
            self._drop(sid)

    def _drop(self, sid: str) -> None:
        self._branches.pop(sid, None)
        self._contexts.pop(sid, None)
        self._ending.pop(sid, None)
