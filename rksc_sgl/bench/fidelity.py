"""Continuation fidelity of decode-KV compression: teacher-forced replay of a full-KV trace.

Exact-answer agreement cannot judge compression when the uncompressed branches are rarely
right (issue 20). CASK's protocol measures the compressed cache itself: generate a trace
with full KV, then replay exactly its tokens (teacher-forced: the replay emits the trace's
token whatever it would have chosen) while the compressor runs as in decoding, and compare,
at every step, the next-token distribution under the compressed cache with the full one.

========================  ============================================================
metric (per replay)       definition, over the trace's steps t
========================  ============================================================
``top1``                  share of steps where argmax(compressed) == argmax(full)
``top5``                  share of steps where argmax(full) is in top-5(compressed)
``kl``                    mean KL(full || compressed), nats
``nll``                   mean -log p_compressed(trace token t) (``nll_full``: full KV's)
``first_mismatch``        first step whose top-1 differs (the trace length if none)
``kv_kept``               decode tokens whose KV the last step reads / tokens decoded
========================  ============================================================

The reference is the trace's own generation, with full KV, every step observed
(``Engine.replay`` without forced tokens). The compressed replays of one trace, plus a full-KV
control (``full``, which must score top-1 1.0 and KL 0 up to batching noise), run as one
batch (``Engine.replay``), each with its own ``CompressionConfig``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch

FULL = "full"


@dataclasses.dataclass
class ReplayScore:
    """Running sums of one replay's comparison with the full-KV reference."""

    steps: int = 0
    top1: int = 0
    top5: int = 0
    kl: float = 0.0
    nll: float = 0.0
    first_mismatch: Optional[int] = None
    kv_kept: float = 1.0

    def add(self, step: int, logprobs: torch.Tensor, reference: torch.Tensor, token: int) -> None:
        best = int(reference.argmax())
        same = int(logprobs.argmax()) == best
        self.steps += 1
        self.top1 += same
        self.top5 += best in torch.topk(logprobs, 5).indices.tolist()
        self.kl += max(float((reference.exp() * (reference - logprobs)).sum()), 0.0)
        self.nll -= float(logprobs[token])
        if not same and self.first_mismatch is None:
            self.first_mismatch = step

    def result(self, nll_full: float) -> Dict[str, float]:
        n = max(self.steps, 1)
        return {"top1": self.top1 / n, "top5": self.top5 / n, "kl": self.kl / n, "nll": self.nll / n,
                "nll_full": nll_full, "first_mismatch": self.steps if self.first_mismatch is None
                else self.first_mismatch, "kv_kept": self.kv_kept, "steps": self.steps}


def full_kv_trace(engine, prompt_ids: Sequence[int], tokens: int, temperature: float,
                  seed: int) -> Tuple[List[int], torch.Tensor]:
    """A trace of ``tokens`` sampled tokens with full KV (EOS ignored) and its ``(tokens,
    vocab)`` next-token log-probs, the reference every replay is compared with."""
    out = torch.empty(tokens, engine.vocab_size)

    def keep(_, req, logprobs):
        out[len(req.output_ids)] = logprobs[: out.shape[1]]

    params = {"max_new_tokens": tokens, "temperature": temperature, "ignore_eos": True, "sampling_seed": seed}
    (req,) = engine.replay(prompt_ids, [None], keep, sampling_params=params)
    return list(req.output_ids), out


def trace_fidelity(engine, prompt_ids: Sequence[int], trace_ids: Sequence[int], reference: torch.Tensor,
                   modes: Dict[str, object]) -> Dict[str, Dict[str, float]]:
    """Every mode's :class:`ReplayScore` result on one trace (``modes``: name -> compression
    config or None; ``reference``: :func:`full_kv_trace`'s log-probs); a teacher-forced
    ``full`` control is added."""
    names = [FULL] + [n for n in modes if n != FULL]
    configs = [None] + [modes[n] for n in names[1:]]
    scores = [ReplayScore() for _ in names]
    prompt = len(prompt_ids)

    def observe(i, req, logprobs):
        step = len(req.output_ids)
        scores[i].add(step, logprobs[: reference.shape[1]].float(), reference[step], trace_ids[step])
        if step:
            scores[i].kv_kept = (req.kv.kv_len - prompt) / step

    engine.replay(prompt_ids, configs, observe, forced_ids=trace_ids)
    nll_full = -float(reference.gather(1, torch.tensor(trace_ids).view(-1, 1)).mean())
    return {name: score.result(nll_full) for name, score in zip(names, scores)}


def mean_ci(values: Sequence[float], samples: int = 2000, seed: int = 0) -> Dict[str, object]:
    """Mean over traces with a 95% percentile bootstrap interval (traces resampled)."""
    from rksc_sgl.bench.report import bootstrap_mean_ci

    values = list(values)
    return {"mean": math.fsum(values) / len(values), "ci95": bootstrap_mean_ci(values, samples, seed)}


def paired_difference(a: List[float], b: List[float], samples: int = 2000, seed: int = 0) -> Dict[str, object]:
    """``mean(a - b)`` over traces (the same traces, in order) with a 95% paired bootstrap."""
    if len(a) != len(b) or not a:
        raise ValueError("a paired difference needs two equally long, non-empty lists")
    return mean_ci([x - y for x, y in zip(a, b)], samples, seed)


# ---- the sweep: methods x budgets over traces (benchmarks/bench_compression.py --fidelity) ---------
VARIANTS = {"window": {"importance": "window"}, "all": {"redundancy_layers": "all"}}
"""Method-name suffixes (``rkv+window+all``) and the ``CompressionConfig`` fields they set;
``+lam=<x>`` sets R-KV's importance weight."""


def mode_config(spec: str, budget: float, base: Dict[str, object]) -> Dict[str, object]:
    """The compression fields of ``spec`` (a method, optionally ``+variant`` suffixes) at ``budget``."""
    method, *variants = spec.split("+")
    config = {**base, "method": method, "budget": budget}
    for variant in variants:
        if variant.startswith("lam="):
            try:
                config["lam"] = float(variant[4:])
            except ValueError:
                raise ValueError(f"{variant!r} in {spec!r}: lam= takes a number") from None
        elif variant in VARIANTS:
            config.update(VARIANTS[variant])
        else:
            raise ValueError(f"unknown variant {variant!r} in {spec!r}; choose from "
                             f"{', '.join(VARIANTS)} or lam=<number>")
    return config


def sweep_modes(specs: Sequence[str], budgets: Sequence[float], base: Dict[str, object]) -> Dict[str, dict]:
    """``{"rkv@0.1": config, ...}``: every method spec at every budget (configs validated here)."""
    from rksc_sgl.rksc.compression import compression_config

    modes = {}
    for spec in specs:
        for budget in budgets:
            config = mode_config(spec, budget, base)
            compression_config(config)  # a bad setting fails before any trace runs
            modes[f"{spec}@{budget:g}"] = config
    return modes


METRICS = ("top1", "top5", "kl", "nll", "first_mismatch", "kv_kept")


def summarize(per_trace: List[Dict[str, Dict[str, float]]], specs: Sequence[str], budgets: Sequence[float],
              samples: int = 2000, seed: int = 0, bar: float = 0.95) -> Dict[str, object]:
    """Means with 95% bootstrap intervals per mode; per budget, R-KV minus each baseline
    (paired over traces); per method, the smallest budget whose mean top-1 reaches ``bar``."""
    names = list(per_trace[0])
    modes = {name: {m: mean_ci([t[name][m] for t in per_trace], samples, seed) for m in METRICS}
             for name in names}
    for name in names:
        modes[name]["nll_full"] = mean_ci([t[name]["nll_full"] for t in per_trace], samples, seed)
    paired = {}
    for budget in budgets:
        for spec in specs:
            if not spec.startswith("rkv"):
                continue
            mine = f"{spec}@{budget:g}"
            for other in specs:
                if other.startswith("rkv"):
                    continue
                theirs = f"{other}@{budget:g}"
                paired[f"{mine} - {theirs}"] = {
                    m: paired_difference([t[mine][m] for t in per_trace], [t[theirs][m] for t in per_trace],
                                         samples, seed) for m in ("top1", "kl")}
    smallest = {}
    for spec in specs:
        reached = [b for b in sorted(budgets) if modes[f"{spec}@{b:g}"]["top1"]["mean"] >= bar]
        smallest[spec] = reached[0] if reached else None
    return {"modes": modes, "paired": paired, "smallest_budget_top1": smallest, "top1_bar": bar,
            "traces": len(per_trace), "specs": list(specs), "budgets": sorted(budgets)}
