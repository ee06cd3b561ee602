"""The report: text and markdown tables, the plot, the saved files and the command line that reproduces a run."""

from __future__ import annotations

import math
import shlex
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional

from rksc_sgl.bench.report import format_table, markdown_table, pyplot, save_and_report, save_figure
from rksc_sgl.bench.modes import BenchSettings, Mode


# ---- report ----------------------------------------------------------------------------------
def _fmt(v, spec: str = ".0f", none: str = "-") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def table_rows(result: Dict[str, Any]) -> List[tuple]:
    """The per-mode rows (shared by the terminal table and the markdown)."""
    rows = [("mode", "s/problem median [IQR]", "x none [95% CI]", "x radix [95% CI]", "prefill tok",
             "exact hit tok", "semantic hit tok", "verifier tok", "verifier run/skip/early", "mean exit layer",
             "CGEE errors", "peak KV tok", "accuracy", "agree w/ radix")]
    sp = result["speedups"]
    for label, s in result["modes"].items():
        def speed(base):
            x = sp.get(base, {}).get(label)
            return "-" if x is None else f"{x['ratio']:.2f} [{x['ci95'][0]:.2f}, {x['ci95'][1]:.2f}]"
        vtok = _fmt(s.get("verifier_new_tokens"))
        if "verify_calls" in s:
            ver = f"{s['verifier_passes_run']}/{s['verifier_passes_skipped']}/{s['verifier_passes_exited_early']}"
            exit_layer = f"{_fmt(s['mean_exit_layer'], '.1f')}/{s['num_layers'] or '-'}"
            errors = (f"{s['cgee_errors']}/{s['cgee_compared_calls']}" if s["cgee"] else "- (full pass)")
        else:
            ver, exit_layer, errors = "-", "-", "-"
        agree = s["agreement_with_radix"]
        rows.append((label, f"{s['median_s']:.2f} [{s['p25_s']:.2f}, {s['p75_s']:.2f}]", speed("none"),
                     speed("radix"), _fmt(s["prefill_tokens"]), _fmt(s["exact_hit_tokens"]),
                     _fmt(s["semantic_hit_tokens"]), vtok, ver, exit_layer, errors, _fmt(s["peak_kv_tokens"]),
                     f"{s['accuracy']:.2f}", "-" if agree is None else f"{agree:.3f}"))
    if any(s.get("stop_rule") for s in result["modes"].values()):
        rows = [row + extra for row, extra in zip(rows, _stop_columns(result))]
    if any("programs_per_s" in s for s in result["modes"].values()):
        rows = [row + extra for row, extra in zip(rows, _serve_columns(result))]
    if _scaled_out(result):
        rows = [row + extra for row, extra in zip(rows, _place_columns(result))]
    return rows


def _scaled_out(result: Dict[str, Any]) -> bool:
    scale_out = result.get("config", {}).get("settings", {}).get("scale_out", "single")
    return scale_out != "single" or any(len(s.get("places") or {}) > 1 for s in result["modes"].values())


def _place_columns(result: Dict[str, Any]) -> List[tuple]:
    """``--scale-out``: each worker's (or DP rank's) cached / prompt tokens over the run, and
    its requests: where a program's branches ran against where its prefix was."""
    out = [("cached/prompt tok per worker (run total)", "requests per worker")]
    for s in result["modes"].values():
        places = s.get("places") or {}
        out.append(("; ".join(f"{p} {c['cached_tokens']}/{c['prompt_tokens']}" for p, c in places.items()) or "-",
                    "; ".join(f"{p} {c['requests']}" for p, c in places.items()) or "-"))
    return out


def _serve_columns(result: Dict[str, Any]) -> List[tuple]:
    """``serve`` columns: throughput, latency, program-level agreement, errors, integrity."""
    out = [("programs/s", "latency p50/p90 s", "programs agree w/ radix [95% CI]",
            "disconnected/refused/accepted bad/failed", "integrity")]
    for s in result["modes"].values():
        e, ci = s["errors"], s.get("program_agreement_ci95")
        agree = "-" if ci is None else f"{s['program_agreement_with_radix']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"
        out.append((f"{s['programs_per_s']:.3f}",
                    f"{_fmt(s['program_latency_p50_s'], '.2f')}/{_fmt(s['program_latency_p90_s'], '.2f')}", agree,
                    f"{e['disconnected']}/{e['malformed_refused']}/{e['malformed_accepted']}/{e['program_failed']}",
                    "ok" if not s["integrity_failures"] else f"{len(s['integrity_failures'])} failed"))
    return out


def _stop_columns(result: Dict[str, Any]) -> List[tuple]:
    """Branch-stop columns: decode tokens (run total), x fewer than radix, branches stopped,
    answers agreeing with radix and the accuracy change, with their 95% intervals."""
    out = [("decode tok total", "x fewer decode than radix", "branches stopped (runs)", "agree w/ radix [95% CI]",
            "accuracy change [95% CI]")]
    for s in result["modes"].values():
        fewer, ci, change = s.get("fewer_decode_tokens_than_radix"), s.get("agreement_with_radix_ci95"), \
            s.get("accuracy_change_vs_radix")
        acc_ci = s.get("accuracy_change_ci95")
        out.append((str(s["decode_tokens_total"]), _fmt(fewer, ".2f"),
                    f"{s['branches_stopped']} ({s['runs_settled_early']})" if s.get("stop_rule") else "-",
                    "-" if ci is None else f"{s['agreement_with_radix']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]",
                    "-" if change is None else f"{change:+.3f} [{acc_ci[0]:+.3f}, {acc_ci[1]:+.3f}]"))
    return out


def load_rows(result: Dict[str, Any]) -> List[tuple]:
    """``load``: per mode and arrival rate, latency percentiles, SLO attainment and goodput,
    and the highest rate up to which every p90 met the SLO (``< r``: the first rate that missed)."""
    load = result.get("load") or {}
    rows = [("mode", "rate /s", "programs", "latency p50/p90/p99 s", "met SLO", "goodput /s", "highest rate at SLO")]
    for label, m in (load.get("modes") or {}).items():
        for rate, r in m["rates"].items():
            rows.append((label, rate, str(r["programs"]),
                         "/".join(_fmt(r[k], ".2f") for k in ("p50_s", "p90_s", "p99_s")),
                         _fmt(r["slo_attainment"], ".2f"), _fmt(r["goodput_per_s"], ".3f"),
                         _fmt(m["max_rate_at_slo"], "g", "none")
                         + ("" if m.get("first_rate_over_slo") is None else f" (< {m['first_rate_over_slo']:g})")))
    return rows


def _share(a: Optional[Dict[str, Any]]) -> str:
    """An agreement ``{k, n, share, ci95}`` as ``k/n share [lo, hi]``."""
    if not a or not a["n"]:
        return "-"
    return f"{a['k']}/{a['n']} {a['share']:.2f} [{a['ci95'][0]:.2f}, {a['ci95'][1]:.2f}]"


def compression_rows(result: Dict[str, Any]) -> List[tuple]:
    """``long-branches``: per mode, throughput, peak running requests, tokens, compression's
    counters, and against the mode uncompressed: throughput and peak ratios, answers agreeing."""
    rows = [("mode", "programs/s", "x uncompressed [95% CI]", "peak running (median)", "x peak running",
             "decode tok", "prompt tok", "computed", "radix-cached", "compactions", "dropped tok",
             "branch answers agree", "program answers agree", "identical texts")]
    for label, m in (result.get("compression") or {}).items():
        vs = m.get("vs_base")
        if vs is None:
            ratio = peak_ratio = "reference" if m["base"] is None else "-"
            agree = ("reference",) * 3 if m["base"] is None else ("-",) * 3
        else:
            ci = vs["throughput_ci95"]
            ratio = f"{vs['throughput_ratio']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]"
            peak_ratio = _fmt(vs["peak_running_ratio"], ".2f")
            agree = tuple(_share(vs[k]) for k in ("branch_answers", "program_answers", "identical_texts"))
        peak = "-" if m["peak_running"] is None else f"{m['peak_running']} ({_fmt(m['peak_running_median'], 'g')})"
        rows.append((label, _fmt(m["programs_per_s"], ".4f"), ratio, peak, peak_ratio, _fmt(m["decode_tokens"]),
                     _fmt(m["prompt_tokens"]), _fmt(m["computed_prompt_tokens"]), _fmt(m["cached_prompt_tokens"]),
                     _fmt(m["compactions"]), _fmt(m["dropped_tokens"]), *agree))
    return rows


COMPRESSION_NOTE = ("long-branches: programs/s = programs / their time, over the timed runs; x uncompressed = "
                    "the mode without +METHOD@BUDGET's median time per problem over this one's (medians over "
                    "repeats, 95% paired bootstrap over problems). Peak running: the most requests SGLang ran "
                    "at once (/v1/loads, sampled every 0.25 s), the highest over the runs (median of the runs' "
                    "peaks). Token counts are run totals: prompt tokens = computed + served by the radix tree "
                    "(radix-cached: what a port with the radix cache off, as R-KV's SGLang port, computes "
                    "again). Agreement with the uncompressed mode on the same problems (first repeats): equal "
                    "final answers (no answer counts as an answer) and identical texts, k/n [95% Wilson].")


def _load_note(result: Dict[str, Any]) -> str:
    load = result["load"]
    return f"SLO {_fmt(load['slo_s'], '.2f')} s ({load['slo_rule']})."


def target_rows(result: Dict[str, Any]) -> List[tuple]:
    rows = [("target", "measured [95% interval]", "needed", "verdict")]
    for t in result["targets"]:
        ci = t.get("interval")
        measured = _fmt(t["value"], ".4g", "not run") + ("" if ci is None else f" [{ci[0]:.4g}, {ci[1]:.4g}]")
        verdict = t.get("verdict") or ("n/a" if t["ok"] is None else ("ok" if t["ok"] else "MISS"))
        rows.append((t["name"], measured, t["target"], verdict))
    return rows


def title_of(result: Dict[str, Any]) -> str:
    st = result["config"]["settings"]
    params = ", ".join(f"{k}={v}" for k, v in result["config"]["params"].items())
    where = "SGLang runtime servers" if result.get("backend") == "runtime" else "embedded engines"
    return (f"rksc-sgl bench ({where}), workload {result['workload']} ({params}): {st['problems']} problems (seed "
            f"{st['seed']}) x {st['repeats']} repeats, {st['warmup']} warm-up; model {st['model']}, "
            f"{result['engine_num_threads']} thread, {result['cpu']}; torch {result['versions']['torch']}, "
            f"sglang {result['versions']['sglang']}")


def text_report(result: Dict[str, Any]) -> str:
    out = format_table(table_rows(result))
    if result.get("load"):
        out += "\n\n" + format_table(load_rows(result)) + "\n" + _load_note(result)
    if result.get("compression"):
        out += "\n\n" + format_table(compression_rows(result))
    if result["targets"]:
        out += "\n\n" + format_table(target_rows(result))
    return out


def markdown_report(result: Dict[str, Any]) -> str:
    lines = [f"**{title_of(result)}**", "", f"Command: `{result['command']}`", "",
             markdown_table(table_rows(result))]
    if result.get("load"):
        lines += ["", markdown_table(load_rows(result)), "", _load_note(result)]
    if result.get("compression"):
        lines += ["", markdown_table(compression_rows(result)), "", COMPRESSION_NOTE]
    if result["targets"]:
        lines += ["", markdown_table(target_rows(result)), "",
                  "Verdicts: a target with a 95% interval (speedups: paired bootstrap; agreement and error "
                  "rates: Wilson) is ok when the interval's conservative end meets it, MISS when even its other "
                  "end does not, and undecided (n too small) otherwise; a target without one (token counts, "
                  "rates at the SLO, an every-run check) is judged on its value."]
    lines += ["", "Speedups: ratios of per-problem median times measured in this run, 95% paired bootstrap "
                  "interval over problems. Verifier run/skip/early: verify calls whose pass ran / was skipped "
                  "(gate 1) / stopped some branch before the last layer (gate 2). CGEE errors: gated decisions "
                  "that differ from the full pass / verify calls compared. Token counts are medians per "
                  "program; hits are prompt tokens served from the cache (exact) or from a similar span "
                  "(ASKS); verifier tok: tokens the verify step computed (not in prefill tok)."]
    if _scaled_out(result):
        lines += ["", "Per worker (--scale-out): each scheduler's cached (SGLang's count, ASKS donors' tokens "
                      "included) / prompt tokens and requests, summed over the timed runs; wN is worker N behind "
                      "the router (its --weight-version tag), rN the DP rank that answered."]
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], path: Path) -> None:
    """Three panels: speedup with error bars, hit tokens, fidelity against tau."""
    plt = pyplot()

    labels = list(result["modes"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    ax = axes[0]
    bases = [b for b in ("none", "radix") if b in result["speedups"]]
    width = 0.8 / max(len(bases), 1)
    for j, base in enumerate(bases):
        sp = result["speedups"][base]
        vals = [sp[lab]["ratio"] for lab in labels]
        err = [[max(v - sp[lab]["ci95"][0], 0) for v, lab in zip(vals, labels)],
               [max(sp[lab]["ci95"][1] - v, 0) for v, lab in zip(vals, labels)]]
        xs = [i + (j - (len(bases) - 1) / 2) * width for i in range(len(labels))]
        ax.bar(xs, vals, width, yerr=err, capsize=3, label=f"vs {base}",
               color=["tab:gray", "tab:green"][j % 2])
        for x, v, up in zip(xs, vals, err[1]):
            ax.annotate(f"{v:.2f}", (x, v + up), xytext=(0, 2), textcoords="offset points", ha="center",
                        va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--")
    ax.set_xticks(range(len(labels)), labels, rotation=20)
    ax.set_ylabel("speedup (ratio of median s/problem)")
    ax.set_title("speedup, 95% bootstrap CI", fontsize=10)
    if bases:
        ax.legend(fontsize=8)

    ax = axes[1]
    pre = [result["modes"][lab]["prefill_tokens"] for lab in labels]
    exact = [result["modes"][lab]["exact_hit_tokens"] for lab in labels]
    sem = [result["modes"][lab]["semantic_hit_tokens"] for lab in labels]
    ax.bar(labels, pre, color="tab:gray", label="prefill computed")
    ax.bar(labels, exact, bottom=pre, color="tab:green", label="exact hits")
    ax.bar(labels, sem, bottom=[a + b for a, b in zip(pre, exact)], color="tab:orange", label="semantic hits")
    ver = [result["modes"][lab].get("verifier_new_tokens") or 0 for lab in labels]
    if any(ver):
        ax.bar(labels, ver, bottom=[a + b + c for a, b, c in zip(pre, exact, sem)], color="tab:purple",
               label="verifier computed")
    tops = [a + b + c + d for a, b, c, d in zip(pre, exact, sem, ver)]
    ax.set_ylim(0, max(max(tops), 1) * 1.35)  # room for the legend above the bars
    ax.set_ylabel("tokens per program (median)")
    ax.set_title("where prompt tokens came from", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    ax.legend(fontsize=8)

    ax = axes[2]
    pts = [(s["tau"], s.get("agreement_with_radix"), s.get("output_agreement_with_radix"),
            s["semantic_hit_tokens"], lab) for lab, s in result["modes"].items() if s.get("tau") is not None]
    pts = [p for p in pts if p[1] is not None]
    title = "fidelity against tau"
    if any(result["modes"][p[4]]["cgee"] and "verify_calls" in result["modes"][p[4]] for p in pts):
        title += "\n(answers of CGEE modes also depend on CGEE's gates)"
    if pts:
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label="answer agreement with radix")
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "s--", label="identical outputs")
        for p in pts:
            ax.annotate(f"{p[4]}\n{p[3]:.0f} sem. tok", (p[0], p[1]), fontsize=7, textcoords="offset points",
                        xytext=(4, -18))
        ax.set_ylim(-0.05, 1.1)
        ax.set_xlabel("ASKS tau")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no ASKS mode (or no radix run)\nin this run", ha="center", va="center",
                transform=ax.transAxes)
    ax.set_ylabel("fidelity")
    ax.set_title(title, fontsize=10)
    st = result["config"]["settings"]
    save_figure(fig, path, f"rksc-sgl bench {result['workload']}: {st['model']}, {st['problems']} problems x "
                           f"{st['repeats']} repeats, {result['engine_num_threads']} thread, {result['cpu']}",
                fontsize=9, dpi=100)


def save(result: Dict[str, Any], out_dir: Path, name: Optional[str] = None) -> Dict[str, Path]:
    """Write ``bench_<workload>.{json,md,png}`` (``bench_runtime_<workload>`` for the runtime) and print the table."""
    return save_and_report(result, text_report(result), Path(out_dir), name or result["benchmark"],
                           plot, title_of(result), markdown=markdown_report(result))


def command_line(workload: str, modes: Iterable[Mode], settings: BenchSettings,
                 out_dir: Optional[str] = None) -> str:
    """The ``rksc-sgl bench`` command that reproduces a run (every setting explicit)."""
    parts = ["rksc-sgl", "bench", "--workload", workload, "--modes", ",".join(m.label for m in modes),
             "--problems", str(settings.problems), "--seed", str(settings.seed), "--repeats", str(settings.repeats),
             "--warmup", str(settings.warmup), "--model-path", settings.model, "--threads", str(settings.threads),
             "--device", settings.device, "--dtype", settings.dtype, "--kv-pool-tokens", str(settings.kv_pool_tokens),
             "--asks-tau", f"{settings.asks_tau:g}",
             "--asks-recompute", f"{settings.asks_recompute:g}", "--asks-key-layer", str(settings.asks_key_layer),
             "--audit-fraction", f"{settings.audit_fraction:g}", "--backend", settings.backend]
    if settings.server_args:
        parts += ["--server-args", settings.server_args]
    if settings.servers != "together":
        parts += ["--servers", settings.servers]
    if settings.scale_out != "single":
        parts += ["--scale-out", settings.scale_out]
    if settings.router_policy != "cache_aware":
        parts += ["--router-policy", settings.router_policy]
    if settings.router_args:
        parts += ["--router-args", settings.router_args]
    for key, value in settings.params.items():
        if value is not None:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    if out_dir is not None:
        parts += ["--out-dir", str(out_dir)]
    return shlex.join(parts)
