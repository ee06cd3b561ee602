"""The runtime's per-request sampling seeds (``rksc_sgl.runtime.seeded_sampling``), no server."""

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
