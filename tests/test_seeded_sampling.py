"""The runtime's per-request sampling seeds (``rksc_sgl.runtime.seeded_sampling``), no server."""

import importlib.util
import subprocess
import sys
import types

import pytest
import torch

from rksc_sgl.runtime import seeded_sampling as ss

M32 = 0xFFFFFFFF


def _rotl(x: int, r: int) -> int:
    return ((x << r) | (x >> (32 - r))) & M32


def _mix(h: int, k: int) -> int:
    k = (k * 0xCC9E2D51) & M32
    k = (_rotl(k, 15) * 0x1B873593) & M32
    h = _rotl(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & M32


def reference_murmur(seed: int, position: int, column: int) -> int:
    """MurmurHash3 (x86, 32-bit) of the 16-byte key (seed low, seed high, position, column)
    with hash seed 0, in Python's unbounded integers."""
    seed &= (1 << 64) - 1
    h = 0
    for block in (seed & M32, seed >> 32, position & M32, column & M32):
        h = _mix(h, block)
    h ^= 16
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & M32
    return h ^ (h >> 16)


def test_the_torch_hash_equals_murmur3_on_every_row_and_column():
    seeds = torch.tensor([7, -3, 2**40 + 5, 0, 2**63 - 1]).to(torch.uint64)
    positions = torch.tensor([0, 5, 123456, 2**31, 17])
    cols = torch.arange(64)
    hashed = ss.murmur_hash32(seeds, positions, cols)
    assert hashed.dtype == torch.uint32 and hashed.shape == (5, 64)
    signed = [7, -3, 2**40 + 5, 0, 2**63 - 1]
    expected = [[reference_murmur(s, int(p), c) for c in range(64)] for s, p in zip(signed, positions.tolist())]
    assert hashed.to(torch.int64).tolist() == expected


def _req(rid, seed):
    return types.SimpleNamespace(rid=rid, sampling_params=types.SimpleNamespace(sampling_seed=seed))


def test_each_row_gets_its_seed_or_one_from_its_request_id():
    batch = types.SimpleNamespace(reqs=[_req("a", 5), _req("b", None), _req("b", None)])
    info = types.SimpleNamespace(sampling_seed=None, device="cpu")
    ss.seed_rows(None, info, batch, 49152)
    seeds = info.sampling_seed.tolist()
    assert seeds[0] == 5 and seeds[1] == seeds[2] == ss.request_seed(_req("b", None))
    kept = types.SimpleNamespace(sampling_seed=torch.tensor([42]), device="cpu")  # SGLang's own (deterministic)
    ss.seed_rows(None, kept, types.SimpleNamespace(reqs=[_req("c", 9)]), 49152)
    assert kept.sampling_seed.tolist() == [42]


def test_min_p_is_refused_and_the_switch_reads_only_clear_values():
    with pytest.raises(ValueError, match="min_p > 0 cannot be sampled with per-request seeds"):
        ss.refuse_min_p(None, types.SimpleNamespace(min_p=0.05))
    assert ss.refuse_min_p("kept", types.SimpleNamespace(min_p=0.0)) == "kept"
    assert [ss.seeded_sampling_from_env({ss.ENV_VAR: v}) for v in ("1", "on", "TRUE", "0", "off", "")] == \
        [True, True, True, False, False, False]
    assert ss.seeded_sampling_from_env({}) is False
    with pytest.raises(ValueError, match="expected 1/on/true or 0/off/false"):
        ss.seeded_sampling_from_env({ss.ENV_VAR: "2"})


# A child process: importing SGLang's sampler needs the sgl_kernel stand-in on this machine, and
# the stand-in changes sys.meta_path, which must not leak into the suite.
SAMPLER_CHECK = """
import json, os, torch
from rksc_sgl.gpu_stack import install_sgl_kernel_standin
install_sgl_kernel_standin()
from rksc_sgl.runtime import seeded_sampling as ss
ss.ensure_cpu_hash()
from sglang.srt.layers import sampler
from sglang.srt.sampling.sampling_params import TOP_K_ALL
original = sampler.top_k_top_p_min_p_sampling_from_probs_torch
torch.manual_seed(0)
n = 12
probs = torch.softmax(torch.randn(n, 300) * 2, dim=-1)
seeds, positions = torch.arange(n) + 1000, torch.arange(n) + 30
top_ks = torch.full((n,), TOP_K_ALL); top_ps = torch.ones(n); min_ps = torch.zeros(n)
top_ks[8] = 1; top_ps[9] = 0.9; top_ks[10] = 20; top_ks[11] = 1   # two greedy rows, two truncating rows
def hooked(p, k, t, m, s, pos):
    return ss.sample_rows_alike(original, p, k, t, m, False, s, pos, max_top_k=None).tolist()
def alone(i):  # the path SGLang takes for a batch of this one row
    r = slice(i, i + 1)
    if top_ks[i] <= 1:
        return int(probs[i].argmax())
    if top_ks[i] == TOP_K_ALL and top_ps[i] == 1.0:
        return sampler.sampling_from_probs_torch(probs[r], seeds[r], positions[r]).tolist()[0]
    return original(probs[r], top_ks[r], top_ps[r], min_ps[r], False, seeds[r], positions[r]).tolist()[0]
order = [11, 3, 9, 0, 7, 10, 5, 8, 1, 6, 2, 4]  # the same rows in another order
permuted = hooked(probs[order], top_ks[order], top_ps[order], min_ps[order], seeds[order], positions[order])
print(json.dumps({
    "mixed": hooked(probs, top_ks, top_ps, min_ps, seeds, positions),
    "alone": [alone(i) for i in range(n)],
    "permuted": [permuted[order.index(i)] for i in range(n)],
    "untruncated_only": hooked(probs[:8], top_ks[:8], top_ps[:8], min_ps[:8], seeds[:8], positions[:8]),
    "stock_mixed": original(probs, top_ks, top_ps, min_ps, False, seeds, positions).tolist(),
    "unseeded_is_stock": original is not None and ss.sample_rows_alike(
        lambda *a, **k: "stock", probs, top_ks, top_ps, min_ps, False, None, positions) == "stock",
}))
"""


@pytest.mark.skipif(importlib.util.find_spec("sgl_kernel") is not None, reason="a real sgl_kernel is installed")
def test_a_seeded_row_samples_the_same_token_whatever_else_is_in_its_batch():
    import json

    out = subprocess.run([sys.executable, "-c", SAMPLER_CHECK], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    # Each row, in a batch mixed with greedy and truncating rows, in any order, is the token the
    # row samples in a batch of its own; rows that truncate nothing equal SGLang's untruncated path.
    assert got["mixed"] == got["alone"] == got["permuted"]
    assert got["untruncated_only"] == got["alone"][:8]
    # Stock SGLang's sorted path, which every row takes once one row truncates, samples the
    # untruncated rows differently from their own batch: what the hook removes.
    assert got["stock_mixed"][:8] != got["alone"][:8]
    assert got["unseeded_is_stock"]
