"""The CUDA/FlashInfer path, checked on the CPU.

FlashInfer itself needs a GPU; what can go wrong without one is what we hand it: the
device choice, the page tables built from SGLang's pool rows, the cascade split of
shared prefixes, and the merge of the two passes. Those are checked here against an
attention computed directly in torch from the page tables (``reference_paged``), and a
stand-in ``flashinfer`` module built on that reference drives the engine's real
FlashInfer code path end to end on the CPU.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

from rksc_sgl.config import EngineConfig, resolve_hardware
from rksc_sgl.model.attention_plan import plan_attention
from rksc_sgl.model.runner import ForwardItem, ModelRunner
from rksc_sgl.model.attention import cascade_layout, merge_states, paged_batch


def _never():
    raise AssertionError("flashinfer was looked for on a CPU-only choice")


@pytest.mark.parametrize("request_, cuda, flashinfer, expected", [
    (("auto", "auto", "auto"), False, _never, ("cpu", "float32", "torch")),
    (("cpu", "bfloat16", "auto"), True, _never, ("cpu", "bfloat16", "torch")),
    (("auto", "auto", "auto"), True, lambda: True, ("cuda", "bfloat16", "flashinfer")),
    (("auto", "auto", "auto"), True, lambda: False, ("cuda", "bfloat16", "torch")),
    (("auto", "float32", "auto"), True, lambda: True, ("cuda", "float32", "torch")),
    (("cuda", "float16", "flashinfer"), True, lambda: True, ("cuda", "float16", "flashinfer")),
])
def test_cuda_path_is_chosen_only_with_cuda(request_, cuda, flashinfer, expected):
    assert resolve_hardware(*request_, cuda_available=cuda, flashinfer_installed=flashinfer) == expected


@pytest.mark.parametrize("request_, cuda, flashinfer, message", [
    (("cuda", "auto", "auto"), False, _never, "sees no CUDA GPU"),
    (("auto", "auto", "flashinfer"), False, _never, "needs device='cuda'"),
    (("cuda", "auto", "flashinfer"), True, lambda: False, "pip install flashinfer-python"),
    (("cuda", "float32", "flashinfer"), True, lambda: True, "no float32 kernels"),
    (("cuda", "auto", "triton"), True, lambda: True, "attention_backend='triton' is not supported"),
])
def test_bad_hardware_choices(request_, cuda, flashinfer, message):
    with pytest.raises(ValueError, match=message):
        resolve_hardware(*request_, cuda_available=cuda, flashinfer_installed=flashinfer)


def test_engine_on_this_machine_uses_the_cpu_path(radix_engine):
    cfg = radix_engine.config
    assert (cfg.device, cfg.dtype, cfg.attention_backend) == ("cpu", "float32", "torch")
    assert radix_engine.runner.flashinfer is None
    assert radix_engine.kv.kv_pool.get_key_buffer(0).device.type == "cpu"
    assert EngineConfig().device == ("cuda" if torch.cuda.is_available() else "cpu")


# --- page tables against a reference attention computed in torch -----------------------

HEADS, KV_HEADS, DIM = 6, 2, 8
SCALE = DIM ** -0.5


def reference_paged(q, k_buf, v_buf, batch, causal, scale=SCALE):
    """Attention straight from a FlashInfer page table (page size 1), natural-log LSE.

    Query ``j`` of a request with ``n`` queries over ``L`` keys sees keys ``0..L-n+j``
    when causal (FlashInfer's bottom-right alignment), all ``L`` otherwise.
    """
    out = torch.zeros_like(q)
    lse = torch.zeros(q.shape[:2])
    for i in range(batch.batch_size):
        q0, q1 = int(batch.qo_indptr[i]), int(batch.qo_indptr[i + 1])
        slots = batch.kv_indices[int(batch.kv_indptr[i]): int(batch.kv_indptr[i + 1])].long()
        group = q.shape[1] // k_buf.shape[1]  # query head h reads kv head h // group
        keys = k_buf[slots].repeat_interleave(group, dim=1)  # (L, heads, dim)
        values = v_buf[slots].repeat_interleave(group, dim=1)
        scores = torch.einsum("nhd,lhd->hnl", q[q0:q1], keys) * scale
        n, length = q1 - q0, len(slots)
        if causal:
            visible = torch.arange(length)[None, :] <= (length - n + torch.arange(n))[:, None]
            scores = scores.masked_fill(~visible, float("-inf"))
        lse[q0:q1] = torch.logsumexp(scores, -1).T
        out[q0:q1] = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, -1), values)
    return out, lse


def _batch_items(gen):
    """A mixed batch: a fresh prefill, an extension after a cached prefix, three decode
    branches of a fork sharing 70 prefix slots, and a lone decode. Slots are scattered."""
    perm = torch.randperm(400, generator=gen) + 1
    prefix = perm[:70]
    items = [
        ForwardItem([1] * 5, 0, perm[100:105]),
        ForwardItem([2] * 3, 7, perm[110:120]),
    ]
    for b, extra in enumerate((3, 1, 6)):
        own = perm[200 + 10 * b: 200 + 10 * b + extra]
        items.append(ForwardItem([3], 70 + extra - 1, torch.cat([prefix, own])))
    items.append(ForwardItem([4], 79, perm[300:380]))
    return items


def test_page_tables_list_each_requests_slots():
    rows = [torch.tensor([5, 9, 2]), torch.tensor([7])]
    batch = paged_batch(rows, [2, 1])
    assert batch.qo_indptr.tolist() == [0, 2, 3]
    assert batch.kv_indptr.tolist() == [0, 3, 4]
    assert batch.kv_indices.tolist() == [5, 9, 2, 7]
    assert batch.kv_last_page_len.tolist() == [1, 1]
    assert {t.dtype for t in (batch.qo_indptr, batch.kv_indptr, batch.kv_indices)} == {torch.int32}
    with pytest.raises(ValueError, match="only 1 keys"):
        paged_batch([torch.tensor([1])], [2])


def test_cascade_layout_splits_shared_prefixes():
    items = _batch_items(torch.Generator().manual_seed(0))
    plan = plan_attention(items, 64)
    layout = cascade_layout(items, plan)
    assert len(plan.groups) == 1 and layout.shared.batch_size == 1
    assert layout.shared_rows.tolist() == [8, 9, 10]  # the three branches' query rows
    assert layout.shared.kv_indices.tolist() == items[2].slots[:70].tolist()
    # Main pass: each branch attends only to its own slots after the shared prefix.
    main = layout.main
    assert (main.kv_indptr[1:] - main.kv_indptr[:-1]).tolist() == [5, 10, 3, 1, 6, 80]
    assert main.kv_indices[15:18].tolist() == items[2].slots[70:].tolist()
    assert layout.torch_items == []


def test_cascade_through_page_tables_equals_the_cpu_attention(radix_engine):
    """FlashInfer's two passes, computed from the page tables, give the CPU path's output."""
    gen = torch.Generator().manual_seed(1)
    items = _batch_items(gen)
    k_buf, v_buf = torch.randn(401, KV_HEADS, DIM, generator=gen), torch.randn(401, KV_HEADS, DIM, generator=gen)
    total = sum(len(it.token_ids) for it in items)
    q = torch.randn(total, HEADS, DIM, generator=gen)

    plan = plan_attention(items, 64)
    layout = cascade_layout(items, plan)
    out, lse = reference_paged(q, k_buf, v_buf, layout.main, causal=True)
    rows = layout.shared_rows
    out_s, lse_s = reference_paged(q[rows], k_buf, v_buf, layout.shared, causal=False)
    out[rows] = merge_states(out[rows], lse[rows], out_s, lse_s)

    cpu = types.SimpleNamespace(num_kv_heads=KV_HEADS, head_dim=DIM, scaling=SCALE, slot_attention=None)
    for name in ("_torch_attention", "_attend_item", "_sdpa", "_shared_prefix_decode"):
        setattr(cpu, name, getattr(ModelRunner, name).__get__(cpu))
    expected = cpu._torch_attention(q.transpose(0, 1)[None], k_buf, v_buf, plan, collect=False)
    torch.testing.assert_close(out, expected[0].transpose(0, 1), rtol=1e-5, atol=1e-5)


def test_merge_states_equals_one_softmax():
    gen = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(4, 1, DIM, generator=gen), torch.randn(9, 1, DIM, generator=gen), torch.randn(9, 1, DIM, generator=gen)
    scores = torch.einsum("nhd,lhd->hnl", q, k)
    whole = torch.einsum("hnl,lhd->nhd", torch.softmax(scores, -1), v)
    parts = [(torch.einsum("hnl,lhd->nhd", torch.softmax(s, -1), vv), torch.logsumexp(s, -1).T)
             for s, vv in ((scores[..., :4], v[:4]), (scores[..., 4:], v[4:]))]
    torch.testing.assert_close(merge_states(*parts[0], *parts[1]), whole)
    # FlashInfer's LSE is base 2: the same merge, told the base.
    base2 = [(o, s / torch.log(torch.tensor(2.0))) for o, s in parts]
    torch.testing.assert_close(merge_states(*base2[0], *base2[1], log_base=2.0), whole)


# --- the engine's FlashInfer code path, driven by a stand-in module ---------------------

class _ReferenceWrapper:
    """``BatchPrefillWithPagedKVCacheWrapper`` with the torch reference inside."""

    def __init__(self, workspace, layout, backend):
        assert layout == "NHD" and workspace.dtype == torch.uint8 and backend == "fa2"

    def plan(self, qo_indptr, kv_indptr, kv_indices, last_page_len, num_qo_heads, num_kv_heads, head_dim,
             page_size, causal, sm_scale, q_data_type, kv_data_type):
        assert page_size == 1 and (last_page_len == 1).all()
        self.batch = types.SimpleNamespace(qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices,
                                           batch_size=len(qo_indptr) - 1)
        self.causal, self.scale, self.heads = causal, sm_scale, (num_qo_heads, num_kv_heads)

    def run(self, q, kv, return_lse=False):
        k_cache, v_cache = kv
        assert k_cache.shape[1] == 1 and k_cache.shape[2] == self.heads[1]  # (pages, 1 token, kv heads, dim)
        assert q.shape[1] == self.heads[0]
        out, lse = reference_paged(q, k_cache[:, 0], v_cache[:, 0], self.batch, self.causal, self.scale)
        return (out, lse / torch.log(torch.tensor(2.0))) if return_lse else out


@pytest.fixture()
def fake_flashinfer(monkeypatch):
    module = types.SimpleNamespace(
        BatchPrefillWithPagedKVCacheWrapper=_ReferenceWrapper,
        merge_state=lambda va, sa, vb, sb: (merge_states(va, sa, vb, sb, log_base=2.0), None),
    )
    monkeypatch.setitem(sys.modules, "flashinfer", module)
    return module


def _pool(runner_model, size=512):
    layout = ModelRunner.layout_of(runner_model)
    return MHATokenToKVPool(size=size, page_size=1, dtype=layout.dtype, head_num=layout.num_kv_heads,
                            head_dim=layout.head_dim, layer_num=layout.num_layers, device="cpu",
                            enable_memory_saver=False)


def test_flashinfer_code_path_matches_the_torch_path(radix_engine, fake_flashinfer):
    """Same model, same steps: a prompt, three forked branches decoding together, and an
    ASKS-style item at scattered positions; logits agree between the two backends."""
    model = radix_engine.hf_model
    prompt = radix_engine.tokenizer.encode("Question: what is 17 + 25? Think step by step. " * 6)
    n = len(prompt)
    assert n > 64
    runs = {}
    for backend in ("torch", "flashinfer"):
        runner = ModelRunner(model, _pool(model), shared_prefix_min_tokens=64, attention_backend=backend)
        assert (runner.flashinfer is not None) == (backend == "flashinfer")
        prefix = torch.arange(1, n + 1)
        logits = [runner.forward([ForwardItem(prompt, 0, prefix)])[0]]
        rows = [prefix.clone() for _ in range(3)]
        for step in range(3):
            items = []
            for b in range(3):
                rows[b] = torch.cat([rows[b], torch.tensor([n + 1 + 3 * step + b])])
                items.append(ForwardItem([100 + b + step], len(rows[b]) - 1, rows[b]))
            logits.extend(runner.forward(items))
        scattered = ForwardItem([7, 8], 5, torch.arange(1, 12), token_positions=[5, 10])
        logits.extend(runner.forward([scattered, ForwardItem([9], len(rows[0]), torch.cat([rows[0], torch.tensor([500])]))]))
        runs[backend] = logits
    for a, b in zip(runs["torch"], runs["flashinfer"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
