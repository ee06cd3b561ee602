"""Per-request sampling seeds in SGLang's runtime, without ``--enable-deterministic-inference``.

SGLang 0.5.23 accepts ``sampling_params.sampling_seed`` on every request but uses it only
when ``--enable-deterministic-inference`` is on (``SamplingBatchInfo.from_schedule_batch``
builds the per-row seed tensor only then), and that flag needs attention backends the CPU
runtime does not have. ``rksc_sgl.vote``'s paired comparisons (``seed_branches``: branch
*i* of program *p* samples with the same seed in every mode, so ``radix`` and ``rksc``
differ only where a branch was stopped) need the seeds honoured on these CPUs too.

``rksc-sgl launch-server --seeded-sampling on`` sets :data:`ENV_VAR` in the server's
environment; every SGLang process inherits it, and the plugin then registers three hooks:

==================================================  ===============================================
hook (SGLang's plugin ``HookRegistry``)              what it does
==================================================  ===============================================
AFTER ``SamplingBatchInfo.adjusted_from_schedule_    fills ``sampling_seed`` with one seed per row
batch`` (SGLang's placeholder for overrides)         (:func:`request_seed`) when SGLang left it
                                                     ``None``; SGLang's torch sampler then draws
                                                     every token as
                                                     ``argmax(logp + gumbel(hash(seed, position)))``
AROUND ``sampler.top_k_top_p_min_p_sampling_      samples each row as its own parameters say,
from_probs_torch`` (SGLang's sorted sampler)         whatever else is in the batch
                                                     (:func:`sample_rows_alike`, below)
AFTER ``SamplingParams.verify``                      refuses ``min_p > 0`` with a 400: SGLang's
                                                     seeded sampler does not renormalise under
                                                     min-p and would stop the scheduler
==================================================  ===============================================

**Why the AROUND hook.** SGLang picks one sampling path per *batch*: when no row truncates
(every ``top_k`` is "all", every ``top_p`` 1) it draws ``argmax(log p + g)`` with the noise
``g`` hashed from each *token id*; as soon as one row truncates (a greedy request is
``top_k = 1``, a verify turn, a ``top_p`` client) every row goes through the sorted sampler,
whose noise is hashed from each token's *rank* after sorting. The same seed then samples a
different token (195 of 200 rows in a direct check), so a branch's text depended on whether
a greedy request shared its batch, and since SGLang's batch flags are sticky (``merge_batch``
ORs them, ``filter_batch`` keeps them) on the whole batch history. On ``serve`` that made 102
of 800 branches differ between two servers that sampled the same seeds (26 from the first
token). The hook splits a seeded batch by row: greedy rows take the argmax (as an all-greedy
batch does), rows that truncate nothing draw with token-id noise (as the untruncated path
does), and only the rows that truncate go through SGLang's sorted sampler, among
themselves. A row's token then depends on its own logits, seed, position and parameters.

Every batch SGLang builds goes through ``from_schedule_batch``, so the seed tensor exists
on every batch and SGLang's own ``filter_batch``/``merge_batch`` keep it row-aligned. A
request without a seed gets one from its request id (random ids, so unseeded requests stay
random, but stable across the batches the request passes through). Under
``--enable-deterministic-inference`` SGLang has filled the tensor itself and the hook
leaves it as it is. The seeded path needs SGLang's ``pytorch`` sampling backend (the
launcher adds ``--sampling-backend pytorch`` on a GPU; a CPU server already uses it).

On a CPU, SGLang's seeded sampler hashes ``(seed, position, token)`` with
``torch.ops.sgl_kernel.murmur_hash32_cpu``, an op of the real ``sgl_kernel`` that the
import-only stand-in (``rksc_sgl.gpu_stack``) lacks. Where it is missing,
:func:`ensure_cpu_hash` defines it with torch integer arithmetic: the MurmurHash3 mix of
SGLang's Triton kernel (``sglang/kernels/ops/sampling/murmur_hash.py``), a 16-byte key of
seed (low, high), position and token id. A real ``sgl_kernel`` keeps its own.

Nothing else changes: greedy rows (``top_k <= 1`` or temperature 0) stay argmax.
"""

from __future__ import annotations

import os
import zlib
from typing import Mapping, Optional

ENV_VAR = "RKSC_SEEDED_SAMPLING"
BATCH_TARGET = "sglang.srt.sampling.sampling_batch_info.SamplingBatchInfo.adjusted_from_schedule_batch"
SORTED_SAMPLER_TARGET = "sglang.srt.layers.sampler.top_k_top_p_min_p_sampling_from_probs_torch"
VERIFY_TARGET = "sglang.srt.sampling.sampling_params.SamplingParams.verify"
MIN_P_REFUSAL = ("min_p > 0 cannot be sampled with per-request seeds on this server "
                 f"(rksc-sgl launch-server --seeded-sampling on, {ENV_VAR}=1): SGLang's seeded sampler "
                 "does not renormalise under min-p; send min_p=0")


def seeded_sampling_from_env(environ: Optional[Mapping[str, str]] = None) -> bool:
    """Whether :data:`ENV_VAR` turns seeded sampling on (``1``/``on``/``true``; ``0``/``off``/
    ``false``/unset: off); ``ValueError`` on another value."""
    value = (os.environ if environ is None else environ).get(ENV_VAR, "").strip().lower()
    if value in ("", "0", "off", "false"):
        return False
    if value in ("1", "on", "true"):
        return True
    raise ValueError(f"{ENV_VAR}={value!r}: expected 1/on/true or 0/off/false")


def request_seed(req) -> int:
    """The seed of one scheduler request: its ``sampling_seed``, else one derived from its id."""
    seed = req.sampling_params.sampling_seed
    if seed is not None:
        return int(seed)
    return zlib.crc32(str(req.rid).encode())


def seed_rows(result, info, batch, *args, **kwargs):
    """AFTER hook of ``adjusted_from_schedule_batch``: one seed per row of the new batch."""
    if info.sampling_seed is None:
        import torch

        seeds = [request_seed(r) for r in batch.reqs]
        info.sampling_seed = torch.tensor(seeds, dtype=torch.int64).to(info.device, non_blocking=True)
    return result


def refuse_min_p(result, params, *args, **kwargs):
    """AFTER hook of ``SamplingParams.verify``: ``ValueError`` (SGLang answers 400) on min-p."""
    if params.min_p > 0:
        raise ValueError(MIN_P_REFUSAL)
    return result


def sample_rows_alike(original, probs, top_ks, top_ps, min_ps, need_min_p_sampling, sampling_seed,
                      positions, *args, return_filtered_probs: bool = False, **kwargs):
    """AROUND hook of SGLang's sorted sampler: in a seeded batch, each row drawn by its own
    parameters (module docstring). Unseeded batches and the sampling-mask capture (which needs
    the sorted tensors back) go to SGLang's function unchanged."""
    if sampling_seed is None or return_filtered_probs or need_min_p_sampling:
        return original(probs, top_ks, top_ps, min_ps, need_min_p_sampling, sampling_seed, positions,
                        *args, return_filtered_probs=return_filtered_probs, **kwargs)
    import torch
    from sglang.srt.layers.sampler import sampling_from_probs_torch
    from sglang.srt.sampling.sampling_params import TOP_K_ALL

    tokens = torch.empty(probs.shape[0], dtype=torch.int32, device=probs.device)
    greedy = top_ks <= 1
    untruncated = ~greedy & (top_ks == TOP_K_ALL) & (top_ps >= 1.0)
    truncated = ~(greedy | untruncated)
    if greedy.any():
        tokens[greedy] = probs[greedy].argmax(dim=-1).to(torch.int32)
    if untruncated.any():  # SGLang's own untruncated draw, on these rows
        rows = untruncated
        tokens[rows] = sampling_from_probs_torch(probs[rows], sampling_seed[rows], positions[rows])
    if truncated.any():
        rows = truncated
        tokens[rows] = original(probs[rows], top_ks[rows], top_ps[rows], min_ps[rows], False,
                                sampling_seed[rows], positions[rows], *args, **kwargs).view(-1)
    return tokens


_MASK32 = 0xFFFFFFFF


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _MASK32


def _murmur_mix(h, k):
    k = _rotl32((k * 0xCC9E2D51) & _MASK32, 15)
    h = _rotl32(h ^ ((k * 0x1B873593) & _MASK32), 13)
    return (h * 5 + 0xE6546B64) & _MASK32


def _murmur_final(h):
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _MASK32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _MASK32
    return h ^ (h >> 16)


def murmur_hash32(seed, positions, col_indices):
    """``(n, m)`` uint32 hashes of each row's ``(seed, position)`` with each column index.

    int64 arithmetic: every product of two 32-bit values wraps modulo 2**64, and only its
    low 32 bits are kept, which are exact."""
    import torch

    seed = seed.view(torch.int64) if seed.dtype == torch.uint64 else seed.to(torch.int64)
    low, high = (seed & _MASK32).view(-1, 1), ((seed >> 32) & _MASK32).view(-1, 1)
    h = _murmur_mix(torch.zeros_like(low), low)
    h = _murmur_mix(h, high)
    h = _murmur_mix(h, (positions.to(torch.int64) & _MASK32).view(-1, 1))
    h = _murmur_mix(h, (col_indices.to(torch.int64) & _MASK32).view(1, -1))
    return _murmur_final(h ^ 16).to(torch.uint32)


def ensure_cpu_hash() -> bool:
    """Define ``sgl_kernel::murmur_hash32_cpu`` when no ``sgl_kernel`` provides it (True if
    defined here)."""
    import torch

    try:
        torch.ops.sgl_kernel.murmur_hash32_cpu  # noqa: B018 (a lookup that raises when missing)
        return False
    except (AttributeError, RuntimeError):
        pass

    op = torch.library.custom_op("sgl_kernel::murmur_hash32_cpu", murmur_hash32, mutates_args=(),
                                 device_types="cpu",
                                 schema="(Tensor seed, Tensor positions, Tensor col_indices) -> Tensor")
    op.register_fake(lambda seed, positions, col_indices: seed.new_empty(
        (seed.shape[0], col_indices.shape[0]), dtype=torch.uint32))
    return True


def register_hooks() -> None:
    """Register the three hooks with SGLang's plugin ``HookRegistry`` (once per process), and the
    CPU hash where it is missing."""
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    ensure_cpu_hash()
    for target, hook, kind in ((BATCH_TARGET, seed_rows, HookType.AFTER),
                               (SORTED_SAMPLER_TARGET, sample_rows_alike, HookType.AROUND),
                               (VERIFY_TARGET, refuse_min_p, HookType.AFTER)):
        if not any(h is hook for _, h, _ in HookRegistry._hooks.get(target, ())):
            HookRegistry.register(target, hook, kind)
