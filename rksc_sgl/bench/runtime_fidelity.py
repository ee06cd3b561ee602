"""Continuation fidelity on SGLang's runtime: the engine's teacher-forced replay
(``rksc_sgl.bench.fidelity``) through ``/generate``, scored with the same :class:`ReplayScore`.

A custom logit processor (:class:`TraceForcing`, server flag ``--enable-custom-logit-processor``)
sees each step's raw logits before anything else touches them. It records their log-softmax
(full vocabulary, float32) in the request's per-token ``customized_info`` (returned as
``meta_info["rksc_logprobs"]``) and, given a trace, masks every token but the trace's, so the
greedy request emits exactly the trace while the server's compressor runs as in decoding.
Why not SGLang's ``return_logprob``: it reports log-probs after the custom processor.
Rationale and limits: docs/kv-compression.md ("Continuation fidelity on SGLang's runtime").
"""

from __future__ import annotations

import base64
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from sglang.srt.sampling.custom_logit_processor import CustomLogitProcessor

from rksc_sgl.bench.fidelity import FULL, ReplayScore

KEY = "rksc_logprobs"
"""The ``meta_info`` key (SGLang's per-token ``customized_info``) with each step's log-probs."""


class TraceForcing(CustomLogitProcessor):
    """Record each step's unprocessed log-probs; with ``trace`` in the params, emit its token."""

    def __call__(self, logits: torch.Tensor, custom_param_list: Optional[List[Dict[str, Any]]] = None):
        for i, params in enumerate(custom_param_list or ()):
            req = (params or {}).get("__req__")
            if req is None:
                continue
            row = torch.log_softmax(logits[i].float(), dim=-1)[: int(params.get("vocab") or logits.shape[1])]
            step = len(req.output_ids)  # (the server runs without overlap: this is the step sampled now)
            info = req.customized_info if req.customized_info is not None else {}
            req.customized_info = info
            values = info.setdefault(KEY, [])
            del values[step:]  # (a re-run of a step replaces it)
            values.extend([None] * (step - len(values)))
            values.append(base64.b64encode(row.cpu().numpy().astype("<f4").tobytes()).decode("ascii"))
            trace = params.get("trace")
            if trace is not None and step < len(trace):
                logits[i].fill_(-math.inf)
                logits[i, int(trace[step])] = 0.0
        return logits


def request_fields(vocab: int, trace: Optional[Sequence[int]] = None,
                   sampling_params: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """The ``/generate`` fields that attach :class:`TraceForcing` (forcing ``trace`` if given)
    to a request with ``sampling_params`` (``custom_params`` is one of them)."""
    params: Dict[str, Any] = {"vocab": int(vocab)}
    if trace is not None:
        params["trace"] = [int(t) for t in trace]
    return {"custom_logit_processor": TraceForcing.to_str(),
            "sampling_params": {**(sampling_params or {}), "custom_params": params}}


def step_logprobs(out: Dict[str, Any], vocab: int) -> torch.Tensor:
    """``(steps, vocab)`` log-probs recorded by :class:`TraceForcing` in one ``/generate`` answer."""
    values = out["meta_info"].get(KEY)
    if not values or any(v is None for v in values):
        raise RuntimeError(f"the server returned no {KEY!r} for some step: is --enable-custom-logit-processor "
                           "on and overlap scheduling off?")
    rows = [np.frombuffer(base64.b64decode(v), dtype="<f4") for v in values]
    if any(r.shape[0] != vocab for r in rows):
        raise RuntimeError(f"{KEY}: expected {vocab} log-probs per step")
    return torch.from_numpy(np.stack(rows))


def runtime_trace(client, prompt_ids: Sequence[int], tokens: int, temperature: float, seed: int,
                  vocab: int, rid: str = "fidelity-trace") -> Tuple[List[int], torch.Tensor]:
    """``full_kv_trace`` on a full-KV server: ``tokens`` sampled tokens (EOS ignored) and
    each step's log-probs, the reference."""
    out = client.generate(input_ids=list(prompt_ids), rid=rid, **request_fields(vocab, None, {
        "max_new_tokens": tokens, "temperature": temperature, "ignore_eos": True, "sampling_seed": seed}))
    return list(out["output_ids"]), step_logprobs(out, vocab)


def forced_replay(client, prompt_ids: Sequence[int], trace_ids: Sequence[int], vocab: int,
                  rid: str) -> Tuple[torch.Tensor, Optional[Dict[str, Any]]]:
    """Replay ``trace_ids`` teacher-forced: each step's log-probs and the server's compression
    decisions for ``rid`` (None without compression). Raises unless it emitted exactly the trace."""
    out = client.generate(input_ids=list(prompt_ids), rid=rid, **request_fields(vocab, trace_ids, {
        "max_new_tokens": len(trace_ids), "temperature": 0, "ignore_eos": True}))
    if list(out["output_ids"]) != list(trace_ids):
        raise RuntimeError(f"replay {rid} did not emit the trace (is --enable-custom-logit-processor on?)")
    state = (client.rksc_state() or {}).get("compression")
    decisions = (state or {}).get("decisions", {}).get(rid)
    return step_logprobs(out, vocab), decisions


def score(logprobs: torch.Tensor, reference: torch.Tensor, trace_ids: Sequence[int],
          decisions: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """:class:`ReplayScore`'s result for one replay (``kv_kept`` from the server's decisions:
    decode tokens the last step reads over tokens decoded, as the engine counts it)."""
    result = ReplayScore()
    for step, token in enumerate(trace_ids):
        result.add(step, logprobs[step], reference[step], int(token))
    last = len(trace_ids) - 1
    if decisions and last > 0:  # (the request ends after its last forward: no compaction after it)
        result.kv_kept = (last - int(decisions["dropped"])) / last
    nll_full = -float(reference.gather(1, torch.tensor(list(trace_ids)).view(-1, 1)).mean())
    return result.result(nll_full)


# ---- servers --------------------------------------------------------------------------------------
def fidelity_server(model: str, compression: Optional[Dict[str, Any]], *, startup_timeout: float = 900,
                    log=None, extra: Sequence[str] = ()):
    """``with fidelity_server(...) as server``: one server for replays (``compression``:
    ``CompressionConfig`` fields, None: full KV), with the processor allowed, overlap off and
    seeded sampling; always ended (``running_server``)."""
    from rksc_sgl.rksc.compression_config import CompressionConfig
    from rksc_sgl.runtime.server_process import free_port, running_server

    argv = ["--model-path", model, "--host", "127.0.0.1", "--port", str(free_port()),
            "--enable-custom-logit-processor", "--disable-overlap-schedule", *extra]
    return running_server(argv, startup_timeout=startup_timeout, log=log, seeded_sampling=True,
                          compression=None if compression is None else CompressionConfig(**compression))


def sweep(model: str, prompts: Sequence[Sequence[int]], seeds: Sequence[int], modes: Dict[str, Dict[str, Any]],
          tokens: int, temperature: float, vocab: int, *, startup_timeout: float = 900, log=None,
          extra: Sequence[str] = (), progress=None, traces: Optional[Sequence[Sequence[int]]] = None
          ) -> Tuple[List[Dict[str, Dict[str, float]]], List[List[int]], List[List[int]]]:
    """Per trace, every mode's scores (``full``: the teacher-forced control on the full-KV
    server), the traces, and the full-KV reference's argmax per step. One server at a time:
    the full one, then one per mode.

    Without ``traces`` the full-KV server samples them (``seeds``) and the reference is that
    generation's log-probs. With ``traces`` (another backend's, e.g. the engine's) it replays
    each one teacher-forced and that replay is the reference: the runtime's own full-KV
    distributions on the same tokens; the control is a second forced replay after a flush."""
    from rksc_sgl.runtime.client import RuntimeClient

    if traces is not None and len(traces) != len(prompts):
        raise ValueError("one trace per prompt")
    per_trace: List[Dict[str, Dict[str, float]]] = [{} for _ in prompts]
    made: List[Tuple[List[int], torch.Tensor]] = []
    with fidelity_server(model, None, startup_timeout=startup_timeout, log=log, extra=extra) as server:
        client = RuntimeClient(server.url)
        for i, (ids, seed) in enumerate(zip(prompts, seeds)):
            client.flush_cache()
            if traces is None:
                trace, reference = runtime_trace(client, ids, tokens, temperature, seed, vocab, rid=f"fid-trace-{i}")
            else:
                trace = [int(t) for t in traces[i]]
                reference, _ = forced_replay(client, ids, trace, vocab, rid=f"fid-reference-{i}")
                client.flush_cache()
            made.append((trace, reference))
            logprobs, _ = forced_replay(client, ids, trace, vocab, rid=f"fid-{FULL}-{i}")
            per_trace[i][FULL] = score(logprobs, reference, trace)
            if progress:
                progress(FULL, i)
    for name, config in modes.items():
        with fidelity_server(model, config, startup_timeout=startup_timeout, log=log, extra=extra) as server:
            client = RuntimeClient(server.url)
            for i, ids in enumerate(prompts):
                trace, reference = made[i]
                client.flush_cache()
                logprobs, decisions = forced_replay(client, ids, trace, vocab, rid=f"fid-{name}-{i}")
                per_trace[i][name] = score(logprobs, reference, trace, decisions)
                if progress:
                    progress(name, i)
    return per_trace, [t for t, _ in made], [r.argmax(-1).tolist() for _, r in made]


# ---- the engine's traces on the runtime: scores paired trace by trace -----------------------------------
TOLERANCE = {"top1": 0.02, "top5": 0.02, "kl": 0.02, "nll": 0.05, "nll_full": 0.05, "first_mismatch": 8.0,
             "kv_kept": 0.01}
"""Per metric, how far apart the two backends' mean scores on the same traces may be and still
count as the same (top-1/top-5: shares of steps; KL, NLL: nats per step; first mismatch: steps)."""
PAIRED_METRICS = ("top1", "top5", "kl", "nll", "first_mismatch", "kv_kept", "nll_full")


def engine_traces(path) -> Dict[str, Any]:
    """What the runtime needs from an engine fidelity run's JSON (``bench_compression.py
    --fidelity``, which records each trace's ``prompt_ids`` and ``trace_ids``): its prompts,
    traces, seeds, per-trace scores, modes, config, and the engine reference's argmax per step."""
    import json

    with open(path) as fh:
        run = json.load(fh)
    traces = run.get("traces") or []
    if not traces or any("trace_ids" not in t or "prompt_ids" not in t for t in traces):
        raise ValueError(f"{path}: its traces carry no token ids (prompt_ids, trace_ids); rerun the engine side "
                         "with this version of bench_compression.py --fidelity")
    if run.get("config", {}).get("backend", "engine") != "engine":
        raise ValueError(f"{path} is not an engine run")
    return {"prompts": [list(t["prompt_ids"]) for t in traces], "traces": [list(t["trace_ids"]) for t in traces],
            "seeds": [t["seed"] for t in traces], "per_trace": run["per_trace"], "modes": run["modes"],
            "config": run["config"], "reference_top1": [t.get("reference_top1") for t in traces]}


def verdict(ci: Sequence[float], tolerance: float) -> str:
    """``same`` when the paired difference's interval holds 0 and lies within +-``tolerance``;
    ``undecided`` when it holds 0 but reaches past the tolerance (too few traces); ``shifted``
    when it excludes 0 but stays within the tolerance; ``differs`` otherwise."""
    lo, hi = ci
    zero, within = lo <= 0 <= hi, -tolerance <= lo and hi <= tolerance
    return {(True, True): "same", (True, False): "undecided", (False, True): "shifted",
            (False, False): "differs"}[(zero, within)]


def compare_backends(engine: Sequence[Dict[str, Dict[str, float]]], runtime: Sequence[Dict[str, Dict[str, float]]],
                     samples: int = 2000, seed: int = 0, tolerance: Optional[Dict[str, float]] = None
                     ) -> Dict[str, Any]:
    """Per mode and metric: both backends' means over the same traces (in order), the
    runtime-minus-engine difference with a 95% paired bootstrap interval over traces, its
    tolerance and :func:`verdict`; per mode, ``same`` when every metric's verdict is."""
    from rksc_sgl.bench.fidelity import mean_ci, paired_difference

    tolerance = {**TOLERANCE, **(tolerance or {})}
    if len(engine) != len(runtime) or not engine:
        raise ValueError("the two backends need the same, non-empty list of traces")
    modes: Dict[str, Any] = {}
    for name in runtime[0]:
        if any(name not in t for t in engine):
            raise ValueError(f"the engine run has no {name!r} scores")
        rows = {}
        for m in PAIRED_METRICS:
            e, r = [t[name][m] for t in engine], [t[name][m] for t in runtime]
            diff = paired_difference(r, e, samples, seed)
            rows[m] = {"engine": mean_ci(e, samples, seed)["mean"], "runtime": mean_ci(r, samples, seed)["mean"],
                       "difference": diff, "tolerance": tolerance[m], "verdict": verdict(diff["ci95"], tolerance[m])}
        modes[name] = {"metrics": rows, "same": all(v["verdict"] == "same" for v in rows.values())}
    return {"modes": modes, "traces": len(engine), "tolerance": tolerance,
            "direction": "runtime minus engine, paired over traces (95% percentile bootstrap)"}


def reference_agreement(engine_top1: Sequence[Optional[Sequence[int]]], runtime_top1: Sequence[Sequence[int]]
                        ) -> List[Optional[float]]:
    """Per trace, the share of steps where the two backends' full-KV references pick the same
    top-1 token (None where the engine recorded no argmax)."""
    out: List[Optional[float]] = []
    for e, r in zip(engine_top1, runtime_top1):
        if e is None:
            out.append(None)
            continue
        if len(e) != len(r):
            raise ValueError("the references cover different numbers of steps")
        out.append(sum(int(a) == int(b) for a, b in zip(e, r)) / max(len(r), 1))
    return out
