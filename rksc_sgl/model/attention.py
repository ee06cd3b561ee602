"""FlashInfer attention over SGLang's token pool, for the embedded engine on CUDA GPUs.

SGLang's ``MHATokenToKVPool`` keeps one (slots, kv_heads, head_dim) buffer per layer and
per K/V; a request's KV is the list of slots in its ``ReqToTokenPool`` row. Seen as a
paged KV cache with one token per page, that is exactly FlashInfer's CSR page table:
``kv_indices`` lists the slots of every request back to back, ``kv_indptr`` says where
each request's run starts, and every last page holds one token. The pool is handed to
FlashInfer as a view, so nothing is copied.

One forward makes two passes (cascade attention, as SGLang and FlashInfer do it):

* the *main* pass: every item of the batch, causal, over its own KV (for a decode branch
  that belongs to a shared-prefix group: only the part of its row after the prefix);
* the *shared* pass: per group of decode branches with a common prefix, all of their
  queries at once over that prefix, read once per step instead of once per branch.

The two partial results of a grouped query are merged with their log-sum-exps. The
index tensors are built here in plain torch (``cascade_layout``) so they can be checked
on any machine against a reference attention computed in torch; only ``FlashInferAttention``
needs a GPU.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence

import torch

WORKSPACE_BYTES = 128 * 1024 * 1024
"""FlashInfer's scratch buffer per wrapper (its documented default size)."""

KERNEL_BACKEND = "fa2"
"""FlashInfer's FlashAttention-2 kernels: every CUDA card, and a JIT build of seconds
rather than the minutes of the Hopper-only FA3 variant (with page size 1 and short
queries, decode-heavy reasoning batches gain little from FA3)."""


@dataclasses.dataclass(frozen=True)
class PagedBatch:
    """FlashInfer's page table for a batch of requests, with a page size of one token.

    Request ``i`` owns query rows ``qo_indptr[i]:qo_indptr[i+1]`` and attends to the pool
    slots ``kv_indices[kv_indptr[i]:kv_indptr[i+1]]`` (oldest first). All int32.
    """

    qo_indptr: torch.Tensor
    kv_indptr: torch.Tensor
    kv_indices: torch.Tensor
    kv_last_page_len: torch.Tensor

    @property
    def batch_size(self) -> int:
        return len(self.qo_indptr) - 1


def paged_batch(kv_rows: Sequence[torch.Tensor], qo_lens: Sequence[int]) -> PagedBatch:
    """The page table of requests that attend to ``kv_rows`` with ``qo_lens`` queries each."""
    if len(kv_rows) != len(qo_lens):
        raise ValueError(f"{len(kv_rows)} KV rows but {len(qo_lens)} query counts")
    for row, n in zip(kv_rows, qo_lens):
        if n > len(row):
            raise ValueError(f"a request has {n} queries but only {len(row)} keys; its own tokens must be in its row")
    kv_lens = torch.tensor([len(r) for r in kv_rows], dtype=torch.int32)
    return PagedBatch(
        qo_indptr=_indptr(torch.tensor(list(qo_lens), dtype=torch.int32)),
        kv_indptr=_indptr(kv_lens),
        kv_indices=(torch.cat([r.to(torch.int32) for r in kv_rows]) if kv_rows
                    else torch.zeros(0, dtype=torch.int32)),
        kv_last_page_len=torch.ones(len(kv_rows), dtype=torch.int32),
    )


def _indptr(lengths: torch.Tensor) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(lengths, 0)
    return out


@dataclasses.dataclass(frozen=True)
class CascadeLayout:
    """The two passes of one forward.

    ``main`` covers every query of the batch in batch order (causal). ``shared`` has one
    request per shared-prefix group; its queries are the batch rows ``shared_rows`` (the
    groups' members, group after group), attending to the prefix without a mask.
    ``torch_items`` are items FlashInfer's contiguous causal mask cannot express (ASKS
    queries at scattered row positions): their rows are recomputed in torch.
    """

    main: PagedBatch
    shared: Optional[PagedBatch]
    shared_rows: torch.Tensor
    torch_items: List[tuple]


def cascade_layout(items, plan) -> CascadeLayout:
    """Page tables for a batch of ``ForwardItem``s, given ``plan_attention``'s grouping."""
    suffix_start = {}  # item index -> where its own (non-shared) KV starts in its row
    shared_rows, prefixes, group_sizes = [], [], []
    by_id = {id(it): i for i, it in enumerate(items)}
    for group in plan.groups:
        shared = group.shared_len
        for (offset, item) in group.members:
            suffix_start[by_id[id(item)]] = shared
            shared_rows.append(offset)
        prefixes.append(group.members[0][1].slots[:shared])
        group_sizes.append(len(group.members))
    kv_rows = [it.slots[suffix_start.get(i, 0):] for i, it in enumerate(items)]
    main = paged_batch(kv_rows, [len(it.token_ids) for it in items])
    shared = paged_batch(prefixes, group_sizes) if prefixes else None
    torch_items = [(off, it, index) for off, it, index in plan.singles if it.token_positions is not None]
    return CascadeLayout(main, shared, torch.tensor(shared_rows, dtype=torch.int64), torch_items)


def merge_states(out_a, lse_a, out_b, lse_b, log_base: float = torch.e):
    """Combine two softmax-attention results over disjoint key sets.

    ``out`` is (rows, heads, dim), ``lse`` (rows, heads) the log-sum-exp of each row's
    scores in ``log_base``; the result is what one softmax over both key sets gives.
    """
    lse_a = lse_a.float() * torch.log(torch.tensor(log_base))
    lse_b = lse_b.float() * torch.log(torch.tensor(log_base))
    peak = torch.maximum(lse_a, lse_b)
    w_a, w_b = torch.exp(lse_a - peak), torch.exp(lse_b - peak)
    out = (out_a.float() * w_a[..., None] + out_b.float() * w_b[..., None]) / (w_a + w_b)[..., None]
    return out.to(out_a.dtype)


class FlashInferAttention:
    """Plans once per forward, then runs every layer's attention with FlashInfer's kernels.

    FlashInfer's kernels take float16 or bfloat16 KV; the engine refuses other dtypes on
    this backend (``EngineConfig``).
    """

    def __init__(self, num_qo_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 dtype: torch.dtype, device: torch.device):
        import flashinfer

        self._flashinfer = flashinfer
        self.num_qo_heads, self.num_kv_heads, self.head_dim = num_qo_heads, num_kv_heads, head_dim
        self.scale, self.dtype, self.device = scale, dtype, device
        self._main, self._shared = (
            flashinfer.BatchPrefillWithPagedKVCacheWrapper(
                torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device), "NHD", backend=KERNEL_BACKEND)
            for _ in range(2))
        self.layout: Optional[CascadeLayout] = None

    def plan(self, layout: CascadeLayout) -> None:
        self.layout = layout
        self._plan(self._main, layout.main, causal=True)
        if layout.shared is not None:
            self._plan(self._shared, layout.shared, causal=False)

    def _plan(self, wrapper, batch: PagedBatch, causal: bool) -> None:
        dev = self.device
        wrapper.plan(
            batch.qo_indptr.to(dev), batch.kv_indptr.to(dev), batch.kv_indices.to(dev),
            batch.kv_last_page_len.to(dev), self.num_qo_heads, self.num_kv_heads, self.head_dim,
            1, causal=causal, sm_scale=self.scale, q_data_type=self.dtype, kv_data_type=self.dtype,
        )

    def run(self, q: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor) -> torch.Tensor:
        """Attention of the batch's queries ``q`` (tokens, heads, dim) over the pool."""
        layout = self.layout
        # The pool's (slots, kv_heads, dim) buffers are pages of one token: a view, no copy.
        kv = (k_buf.unsqueeze(1), v_buf.unsqueeze(1))
        q = q.to(self.dtype).contiguous()
        if layout.shared is None:
            return self._main.run(q, kv)
        out, lse = self._main.run(q, kv, return_lse=True)
        rows = layout.shared_rows.to(q.device)
        out_s, lse_s = self._shared.run(q[rows].contiguous(), kv, return_lse=True)
        merged, _ = self._flashinfer.merge_state(out[rows].contiguous(), lse[rows].contiguous(), out_s, lse_s)
        out[rows] = merged.to(out.dtype)
        return out


def flashinfer_available() -> bool:
    """Whether the ``flashinfer`` package can be imported (it needs a CUDA build of torch)."""
    try:
        import flashinfer  # noqa: F401
    except Exception:  # ImportError, or a CUDA library it cannot load
        return False
    return True
