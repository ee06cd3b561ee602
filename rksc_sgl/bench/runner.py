"""The runner: one engine or server per mode, problems in rotating mode order, then the summary."""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from rksc_sgl.problems import score
from rksc_sgl.bench.report import run_record, source_commit
from rksc_sgl.bench.modes import BenchSettings, Mode, parse_modes
from rksc_sgl.bench.stats import agreement, bootstrap_ratio_ci, paired_with_radix, ratio_of_medians, summarize_mode
from rksc_sgl.bench.tables import command_line
from rksc_sgl.bench.workload import Item, StopPlan, Workload, check_modes, get_workload

WARMUP_SEED_OFFSET = 100_000
"""Warm-up problems come from seed ``seed + WARMUP_SEED_OFFSET``: never a timed problem."""

if TYPE_CHECKING:  # imported where used: they import torch and SGLang
    from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig, VerifyResult


# ---- the runner ----------------------------------------------------------------------------------
def _verify_record(v: VerifyResult) -> Dict[str, Any]:
    g = v.gates
    exited = int(g.get("exited_early") or 0)
    return {"skipped": bool(g["skipped"]), "gated": bool(g["skipped"]) or exited > 0, "exited_early": exited,
            "layers_run": g.get("layers_run"), "num_layers": g.get("num_layers"),
            "mean_exit_layer": g.get("mean_exit_layer"), "vote_share": g.get("vote_share"),
            "verifier_new_tokens": g.get("verifier_new_tokens"), "verifier_s": g.get("verifier_s"),
            "audited": bool(g.get("audited")), "audit_agrees": g.get("audit_agrees"),
            "audit_answer": g.get("audit_answer"), "audit_s": g.get("audit_s"), "answer": v.answer}


def run_once(engine, workload: Workload, item: Item, params: Dict[str, Any], cgee: CGEEConfig,
             audit_log: AuditLog, stop: Optional[StopPlan] = None) -> Dict[str, Any]:
    """One program run, timed, with the engine counters of exactly that run."""
    if workload.flush_between_problems and not engine.flush_cache():
        raise RuntimeError("could not flush the engine's cache (a request is still running)")
    before = engine.stats(reset_peak=True)
    t0 = time.perf_counter()
    outcome = workload.run(engine, item, params, cgee, audit_log, stop=stop if workload.votes else None)
    wall = time.perf_counter() - t0
    stats = engine.stats().since(before).as_dict()
    record = {"wall_s": wall, "audit_s": outcome.audit_s, "time_s": wall - outcome.audit_s, **stats,
              "answer": outcome.answer, "reference": item.problem.answer,
              "correct": score(item.problem, outcome.answer) >= 1.0, "outputs": list(outcome.outputs)}
    if outcome.verify is not None:
        record["verify"] = _verify_record(outcome.verify)
    if outcome.vote is not None:
        record["vote"] = outcome.vote
    record.update(outcome.extra)
    return record


def schedule(items: List[Item], repeats: int, flush_between_problems: bool) -> List[Tuple[Item, int]]:
    """The order of the timed runs: each problem's repeats together when every program starts
    from an empty cache; whole passes over the problems when the cache is kept between them
    (a repeat must not find its own problem's KV from the run just before)."""
    if flush_between_problems:
        return [(item, r) for item in items for r in range(repeats)]
    return [(item, r) for r in range(repeats) for item in items]


def _check_engine(engine, mode: Mode, settings: BenchSettings) -> None:
    """A caller's engine must be configured as the mode says (cache, ASKS, eviction)."""
    want = mode.engine_kwargs(settings)
    cfg = engine.config
    problems = []
    if cfg.cache != want["cache"]:
        problems.append(f"cache={cfg.cache!r}, the mode needs {want['cache']!r}")
    asks = want.get("asks")
    if bool(asks) != bool(cfg.asks.enabled) or (asks and (cfg.asks.tau, cfg.asks.recompute_fraction, cfg.asks.key_layer)
                                               != (asks["tau"], asks["recompute_fraction"], asks["key_layer"])):
        problems.append(f"its ASKS settings ({cfg.asks}) differ from the mode's ({asks})")
    if cfg.eviction_policy != want.get("eviction_policy", "lru"):
        problems.append(f"eviction_policy={cfg.eviction_policy!r}")
    kv = getattr(cfg, "compression", None)
    have = None if kv is None else {"method": kv.method, "budget": kv.budget}
    if have != want.get("compression"):
        problems.append(f"its compression ({have}) differs from the mode's ({want.get('compression')})")
    if problems:
        raise ValueError(f"the engine given for mode {mode.label!r} does not match it: {'; '.join(problems)}")


def _tokenizer(model: str):
    """The tokenizer an engine of ``model`` would load (inputs are built before the engines)."""
    from transformers import AutoTokenizer

    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    return AutoTokenizer.from_pretrained(resolve_model_dir(model, default_cache_dir()), local_files_only=True)


def run_bench(workload: Any, modes: Any, settings: Optional[BenchSettings] = None, *,
              engines: Optional[Dict[str, Any]] = None, progress: bool = True,
              command: Optional[str] = None) -> Dict[str, Any]:
    """Run ``workload`` (a name or :class:`Workload`) under ``modes`` (a spec string or
    :class:`Mode` list) and return the result dict (see the module docstring).

    ``engines`` maps mode labels to engines the caller owns (checked against the mode,
    integrity-checked, never shut down here); every other mode gets an engine built here,
    once, and shut down at the end.
    """
    settings = settings or BenchSettings()
    workload = get_workload(workload) if isinstance(workload, str) else workload
    modes = parse_modes(modes) if isinstance(modes, str) else list(modes)
    check_modes(workload, modes)
    params = workload.resolve(settings.params, settings.backend)
    workload.check_settings(settings, params)
    started = time.perf_counter()
    run_commit = source_commit()  # the code this run imports; the record is written at its end
    if settings.backend == "runtime":
        if engines:
            raise ValueError("engines cannot be given with backend='runtime' (each mode is a server started here)")
        timed = _run_on_runtime(workload, modes, settings, params, progress)
    else:
        timed = _run_on_engines(workload, modes, settings, params, engines, progress)
    runs, warm_runs, engine_configs, overrides, items = timed
    result = summarize(workload, modes, settings, params, items, runs)
    result.update(run_record(
        f"bench_{workload.name}" if settings.backend == "engine" else f"bench_runtime_{workload.name}",
        command or command_line(workload.name, modes, settings), commit=run_commit))
    result.update({
        "engine_num_threads": settings.threads,
        "backend": settings.backend, "engine_configs": engine_configs, "engine_overrides": overrides,
        "warmup_wall_s": warm_runs, "total_wall_s": time.perf_counter() - started,
    })
    return result


def _inputs(workload: Workload, settings: BenchSettings, params: Dict[str, Any], tokenizer):
    """``(warm-up items, timed items, engine overrides)``: the same for every mode and backend."""
    warm = workload.items(tokenizer, params, settings.seed + WARMUP_SEED_OFFSET, settings.warmup) \
        if settings.warmup else []
    items = workload.items(tokenizer, params, settings.seed, settings.problems)
    return warm, items, workload.engine_overrides(tokenizer, params, items)


def _cgee_configs(modes: List[Mode], settings: BenchSettings):
    from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig

    cgee = {m.label: (CGEEConfig(audit_fraction=settings.audit_fraction) if m.cgee else CGEEConfig().full())
            for m in modes}
    return cgee, {m.label: AuditLog() for m in modes}


def _progress(workload: Workload, total: int, progress: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"bench {workload.name}", unit="run", file=sys.stderr,
                disable=not progress, dynamic_ncols=True)


def _run_on_engines(workload, modes, settings, params, engines, progress):
    """Every mode on its own engine in this process, modes taking turns problem by problem."""
    import torch

    from rksc_sgl.engine.backend import Engine

    given = dict(engines or {})
    unknown = sorted(set(given) - {m.label for m in modes})
    if unknown:
        raise ValueError(f"engines given for modes that are not run: {', '.join(unknown)}")
    for mode in modes:
        if mode.label in given:
            _check_engine(given[mode.label], mode, settings)
    torch.set_num_threads(settings.threads)
    owned: Dict[str, Any] = {}
    used: Dict[str, Any] = {}
    try:
        tokenizer = next(iter(given.values())).tokenizer if given else None
        if tokenizer is None:
            tokenizer = _tokenizer(settings.model)
        warm, items, overrides = _inputs(workload, settings, params, tokenizer)
        for mode in modes:  # built one after the other, before any is timed
            if mode.label in given:
                used[mode.label] = given[mode.label]
                continue
            kwargs = {"num_threads": settings.threads, "device": settings.device,
                      **({} if settings.dtype == "auto" else {"dtype": settings.dtype}),
                      "kv_pool_tokens": settings.kv_pool_tokens,
                      "max_running_requests": settings.max_running_requests, "seed": settings.seed,
                      **overrides, **mode.engine_kwargs(settings)}
            owned[mode.label] = used[mode.label] = Engine(model=settings.model, **kwargs)
        with _progress(workload, _total(modes, warm, items, settings), progress) as bar:
            runs, warm_runs = _take_turns(workload, modes, settings, params, used, warm, items, bar)
        for label, engine in used.items():
            engine.check_integrity()
        engine_configs = {label: {k: str(v) for k, v in vars(e.config).items()} for label, e in used.items()}
    finally:
        for engine in owned.values():
            engine.shutdown()
    return runs, warm_runs, engine_configs, overrides, items


def _run_on_runtime(workload, modes, settings, params, progress):
    """Every mode as a real SGLang server (``rksc_sgl.runtime.bench_servers``). With
    ``servers="together"`` all are started before any is timed and idle-sleep while another
    runs, the modes taking turns problem by problem as on the engine; ``one-at-a-time`` runs
    each server through every problem before the next starts. Each server's integrity is
    checked before it is ended."""
    from rksc_sgl.runtime.bench_servers import check_room, mode_server, server_config, server_flags, servers_per_mode

    for mode in modes:  # refuse what the runtime cannot run before any server starts
        server_flags(mode, settings, {}, 0)
    warm, items, overrides = _inputs(workload, settings, params, _tokenizer(settings.model))
    groups = [modes] if settings.servers == "together" else [[mode] for mode in modes]
    configs: Dict[str, Dict[str, Any]] = {}
    runs: Dict[str, List[Dict[str, Any]]] = {}
    warm_runs: Dict[str, List[float]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="rksc-bench-servers-"))
    with _progress(workload, _total(modes, warm, items, settings), progress) as bar:
        for group in groups:
            with contextlib.ExitStack() as servers:
                backends: Dict[str, Any] = {}
                for started, mode in enumerate(group):
                    bar.set_postfix_str(f"starting the {mode.label} server")
                    log_path = log_dir / f"{mode.label}.log"
                    log = servers.enter_context(open(log_path, "w"))
                    backend, command, server = servers.enter_context(
                        mode_server(mode, settings, overrides, log, seeded=workload.votes))
                    if started == 0 and len(group) > 1:  # the rest must fit beside it (N servers each)
                        check_room((len(group) - 1) * servers_per_mode(settings), server.memory_bytes())
                    backends[mode.label] = backend
                    configs[mode.label] = {**server_config(backend, command), "server_log": str(log_path)}
                    if settings.scale_out != "single":
                        configs[mode.label].update(scale_out=settings.scale_out, schedulers=backend.config.schedulers,
                                                   workers=[u.url for u in backend.client.servers()])
                group_runs, group_warm = _take_turns(workload, group, settings, params, backends, warm, items, bar)
                runs.update(group_runs)
                warm_runs.update(group_warm)
                for mode in group:
                    configs[mode.label].update(_attention_hook_cost(backends[mode.label], runs[mode.label],
                                                                    warm_runs[mode.label]))
    return runs, warm_runs, configs, overrides, items


def _total(modes: List[Mode], warm: List[Item], items: List[Item], settings: BenchSettings) -> int:
    """How many program runs a bench makes (the progress bar's length)."""
    return len(modes) * (len(warm) + len(items) * settings.repeats)


def _take_turns(workload, modes, settings, params, backends: Dict[str, Any], warm: List[Item],
                items: List[Item], bar) -> Tuple[Dict[str, List[Dict[str, Any]]], Dict[str, List[float]]]:
    """``(timed runs, warm-up wall times)`` per mode label: the warm-up problems, then every timed
    problem once per mode, the mode that goes first rotating from one problem to the next, so
    that a drift of the machine over the run falls on every mode alike. ``backends`` maps labels
    to engines or ``RuntimeBackend`` clients (the same calls on both)."""
    cgee, audits = _cgee_configs(modes, settings)
    runs: Dict[str, List[Dict[str, Any]]] = {m.label: [] for m in modes}
    warm_runs: Dict[str, List[float]] = {m.label: [] for m in modes}
    for item in warm:
        for mode in modes:
            bar.set_postfix_str(f"warm-up {mode.label}")
            rec = run_once(backends[mode.label], workload, item, params, cgee[mode.label], audits[mode.label],
                           stop=StopPlan.of(mode))
            warm_runs[mode.label].append(rec["wall_s"])
            bar.update()
    for step, (item, r) in enumerate(schedule(items, settings.repeats, workload.flush_between_problems)):
        if not workload.flush_between_problems and item is items[0]:
            for label, backend in backends.items():  # each pass over the problems starts from an empty cache
                if not backend.flush_cache():
                    raise RuntimeError(f"could not flush the {label} cache")
        shift = step % len(modes)
        for mode in modes[shift:] + modes[:shift]:  # rotate who goes first
            bar.set_postfix_str(f"problem {item.index + 1}/{len(items)} {mode.label}")
            rec = run_once(backends[mode.label], workload, item, params, cgee[mode.label], audits[mode.label],
                           stop=StopPlan.of(mode))
            rec.update(problem=item.index, repeat=r)
            runs[mode.label].append(rec)
            bar.update()
    return runs, warm_runs


def _attention_hook_cost(backend, runs: List[Dict[str, Any]], warm: List[float]) -> Dict[str, Any]:
    """What RSBCM's attention hook cost on an ``rksc`` server: its seconds over the mode's wall time."""
    state = backend.client.rksc_state() or {}
    attention = state.get("attention")
    if not attention:
        return {}
    wall = sum(r["wall_s"] for r in runs) + sum(warm)
    return {"attention_hook": attention, "attention_hook_share_of_wall": attention["seconds"] / wall if wall else None}


def summarize(workload: Workload, modes: List[Mode], settings: BenchSettings, params: Dict[str, Any],
              items: List[Item], runs: Dict[str, List[Dict[str, Any]]]) -> Dict[str, Any]:
    """Statistics of the runs: per mode, speedups against ``none`` and ``radix``, targets."""
    from rksc_sgl.rksc.cgee import CGEEConfig

    n = len(items)
    summary = {m.label: summarize_mode(runs[m.label], n) for m in modes}
    for m in modes:
        s = summary[m.label]
        s["tau"] = m.effective_tau(settings)
        s["cgee"] = m.cgee
        if "radix" in runs:
            s["agreement_with_radix"], s["output_agreement_with_radix"] = agreement(runs[m.label], runs["radix"])
            s.update(paired_with_radix(runs[m.label], runs["radix"], settings.bootstrap, settings.seed))
        else:
            s["agreement_with_radix"] = s["output_agreement_with_radix"] = None
    speedups: Dict[str, Dict[str, Any]] = {}
    for base in ("none", "radix"):
        if base not in summary:
            continue
        speedups[base] = {}
        for m in modes:
            b, o = summary[base]["per_problem_s"], summary[m.label]["per_problem_s"]
            lo, hi = bootstrap_ratio_ci(b, o, settings.bootstrap, settings.seed)
            speedups[base][m.label] = {"ratio": ratio_of_medians(b, o), "ci95": [lo, hi]}
    result: Dict[str, Any] = {
        "workload": workload.name, "workload_help": workload.help,
        "config": {"settings": dataclasses.asdict(settings), "params": params,
                   "modes": [{**dataclasses.asdict(m), "label": m.label,
                              "engine_kwargs": m.engine_kwargs(settings)} for m in modes],
                   "flush_between_problems": workload.flush_between_problems,
                   "warmup_seed": settings.seed + WARMUP_SEED_OFFSET,
                   "problem_prompt_tokens": [it.inputs.get("prompt_tokens") for it in items],
                   "cgee_gated": dataclasses.asdict(CGEEConfig(audit_fraction=settings.audit_fraction)),
                   "method": METHOD if settings.backend == "engine" else RUNTIME_METHOD},
        "problems": [{"index": it.index, "question": it.problem.question, "answer": it.problem.answer}
                     for it in items],
        "modes": summary, "speedups": speedups, "runs": runs,
    }
    workload.summarize_modes(result, params)
    result["targets"] = [t.check(result) for t in workload.targets()]
    return result


METHOD = ("Every mode runs in this process on its own engine (built once, one CPU thread), on the same problems; "
          "warm-up problems (seed + 100000) run first on every mode and are dropped. For each problem and repeat "
          "every mode runs once, the order rotating. The cache is flushed before every program unless the "
          "workload keeps it (pressure). Time per problem = median over repeats of the program's wall time, "
          "less the CGEE audit pass (which runs only to count errors). Speedup of mode M over base B = "
          "median_p(t_B) / median_p(t_M), with a 95% paired percentile bootstrap over problems. Token counters "
          "are the engine's for that run (medians over runs; prefill_tokens_total sums them); verifier tokens are counted apart. Agreement: share "
          "of runs whose final answer equals the radix run's on the same problem. CGEE error rate: verify calls "
          "whose gated decision differs from the full pass / verify calls (gated calls are audited).")


RUNTIME_METHOD = ("Every mode runs as a real SGLang server (python -m sglang.launch_server through rksc-sgl's "
                  "launcher; float32 on the CPU, the scheduler bound to --threads cores; with --scale-out, N "
                  "servers behind SGLang's router or one --dp-size N server), on the same problems. With "
                  "--servers together (the default) every mode's server is up before any run is timed, idle "
                  "servers sleep, and the modes take turns problem by problem, the first mode rotating, as on the "
                  "engine; with --servers one-at-a-time each server serves the warm-up problems and every problem "
                  "and repeat before it is ended and the next starts. Warm-up problems (seed + 100000) are "
                  "dropped. The programs run through rksc-sgl's RuntimeBackend (sgl.RuntimeEndpoint) from "
                  "this process. The cache is flushed before every program unless the workload keeps it "
                  "(pressure). Time per problem = median over repeats of the program's wall time, less the CGEE "
                  "audit pass. Speedups as for the engine: ratios of medians with a 95% paired bootstrap over "
                  "problems. Token counters come from the server's meta_info of each request (prompt, cached, "
                  "completion tokens); the runtime reports no per-run KV peak. Agreement as for the engine.")
