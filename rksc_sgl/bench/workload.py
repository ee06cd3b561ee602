"""The workload interface, its registry, and the targets a workload checks."""

from __future__ import annotations

import dataclasses
import operator
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from rksc_sgl.problems import Problem

if TYPE_CHECKING:  # imported where used: they import torch and SGLang
    from rksc_sgl.rksc.cgee import AuditLog, CGEEConfig, VerifyResult


# ---- workloads -------------------------------------------------------------------------------
@dataclasses.dataclass
class Item:
    """One problem of a workload: what its program gets, and the answer to grade against."""

    index: int
    problem: Problem
    inputs: Dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Outcome:
    """What one program run produced."""

    answer: Optional[str]
    outputs: List[str]
    """The generated texts (one per branch, or per request), compared with ``radix``'s."""
    verify: Optional[VerifyResult] = None
    audit_s: float = 0.0
    """Time of CGEE audit passes inside the run (left out of the mode's time)."""
    vote: Optional[Dict[str, Any]] = None
    """With a branch-stop rule: ``{"rule", "stopped", "settled_after"}`` of ``rksc_sgl.vote``."""
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Workload-specific fields of the run's record (``serve``: per-program latencies, answers, errors)."""


UNDECIDED = "undecided (n too small)"


@dataclasses.dataclass(frozen=True)
class Target:
    """A line of the report: ``value(result)`` against ``threshold``.

    With ``interval`` (the value's 95% interval from the same result) the verdict is the
    interval's (or another range the value surely lies in, such as the bracket a grid of
    rates leaves): ``ok`` when its conservative end meets the threshold (the lower end for ``>=``
    and ``>``, the upper for ``<=``), ``MISS`` when even its other end does not, else
    :data:`UNDECIDED`; an interval target whose result has no interval is undecided too.
    Without ``interval`` (counts that do not vary from run to run) the point decides."""

    name: str
    value: Callable[[Dict[str, Any]], Optional[float]]
    op: str  # ">=", ">" or "<="
    threshold: float
    interval: Optional[Callable[[Dict[str, Any]], Optional[Sequence[float]]]] = None
    undecided: str = UNDECIDED
    """The verdict's words when the interval straddles the threshold."""

    def check(self, result: Dict[str, Any]) -> Dict[str, Any]:
        v = self.value(result)
        compare = {">=": operator.ge, ">": operator.gt, "<=": operator.le}[self.op]
        ci = self.interval(result) if self.interval is not None and v is not None else None
        if v is None:
            ok, verdict = None, "not run"
        elif self.interval is None:
            ok = compare(v, self.threshold)
            verdict = "ok" if ok else "MISS"
        elif ci is None:
            ok, verdict = None, self.undecided
        else:
            lo, hi = ci
            conservative, optimistic = (hi, lo) if self.op == "<=" else (lo, hi)
            if compare(conservative, self.threshold):
                ok, verdict = True, "ok"
            elif not compare(optimistic, self.threshold):
                ok, verdict = False, "MISS"
            else:
                ok, verdict = None, self.undecided
        return {"name": self.name, "value": v, "interval": None if ci is None else [ci[0], ci[1]],
                "target": f"{self.op} {self.threshold:g}", "ok": ok, "verdict": verdict}


class Workload:
    """A registered workload: its parameters, problems, program and targets."""

    name = ""
    summary = ""
    """One line for ``rksc-sgl bench --help`` (``help``: the whole description, for ``--list``)."""
    help = ""
    defaults: Dict[str, Any] = {}
    runtime_defaults: Dict[str, Any] = {}
    """Defaults that differ on SGLang's runtime (``--backend runtime``): e.g. ``fork_commit=1``,
    the prefix committed before a fork as SGLang's own ``fork`` does."""
    has_verify = False
    flush_between_problems = True
    votes = False
    """Whether its program votes over forks, so a mode's branch-stop rule applies."""
    waves = False
    """Whether its program can launch its seeded branches in waves (modes ``waves-*``; its
    parameters ``waves_first``, ``waves_step``)."""

    def resolve(self, overrides: Dict[str, Any], backend: str = "engine") -> Dict[str, Any]:
        """The workload's parameters on ``backend`` with ``overrides`` applied (unknown names
        are an error)."""
        unknown = sorted(k for k, v in overrides.items() if v is not None and k not in self.defaults)
        if unknown:
            raise ValueError(f"workload {self.name!r} has no parameter {', '.join(unknown)} "
                             f"(it takes: {', '.join(self.defaults)})")
        params = dict(self.defaults)
        if backend == "runtime":
            params.update(self.runtime_defaults)
        params.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("branches", "max_tokens", "prompt_tokens", "keep", "expand", "programs", "prefixes", "clients"):
            if key in params and (not isinstance(params[key], int) or params[key] < 1):
                raise ValueError(f"{key.replace('_', '-')} must be a positive integer, got {params[key]!r}")
        _check_waves_params(params)
        if "pool_fraction" in params and not 0.0 < params["pool_fraction"] <= 1.0:
            raise ValueError(f"pool-fraction must be in (0, 1], got {params['pool_fraction']!r}")
        if "temperature" in params and not params["temperature"] >= 0:
            raise ValueError(f"temperature must be >= 0, got {params['temperature']!r}")
        return params

    def check_settings(self, settings, params: Dict[str, Any]) -> None:
        """Refuse (``ValueError``) run settings (``BenchSettings``) that do not fit the resolved
        ``params``, before anything is loaded or started; most workloads take any."""

    def items(self, tokenizer, params: Dict[str, Any], seed: int, count: int) -> List[Item]:
        raise NotImplementedError

    def engine_overrides(self, tokenizer, params: Dict[str, Any], items: List[Item]) -> Dict[str, Any]:
        """Engine settings this workload needs (e.g. a small KV pool for ``pressure``)."""
        return {}

    def run(self, engine, item: Item, params: Dict[str, Any], cgee: Optional[CGEEConfig],
            audit_log: AuditLog, stop: Optional[StopPlan] = None) -> Outcome:
        """One program run; ``stop``: the mode's branch stop (only where ``votes``)."""
        raise NotImplementedError

    def summarize_modes(self, result: Dict[str, Any], params: Dict[str, Any]) -> None:
        """Add what only this workload reports across modes to ``result`` (before its targets
        are checked); nothing by default."""

    def targets(self) -> List[Target]:
        return []


WAVES_DEFAULTS = {"waves_first": 0, "waves_step": 2}
"""The wave schedule parameters of a workload with ``waves``: ``waves_first`` branches first
(0: ``branches // 2 + 1``, the fewest whose agreement settles a lossless vote), then
``waves_step`` at a time."""


def _check_waves_params(params: Dict[str, Any]) -> None:
    """``waves_first`` in [0, branches], ``waves_step`` >= 1 (where a workload has them)."""
    first, step = params.get("waves_first"), params.get("waves_step")
    if "waves_first" in params and not (isinstance(first, int) and 0 <= first <= params["branches"]):
        raise ValueError(f"waves-first must be an integer from 0 (branches // 2 + 1) to branches "
                         f"({params['branches']}), got {first!r}")
    if "waves_step" in params and not (isinstance(step, int) and step >= 1):
        raise ValueError(f"waves-step must be a positive integer, got {step!r}")


@dataclasses.dataclass(frozen=True)
class StopPlan:
    """How a voting program ends its branches (what a mode's ``stop`` and ``waves`` say):
    ``rule``, a ``rksc_sgl.vote`` rule by name; with ``waves`` the seeded branches are launched
    by ``rksc_sgl.vote_waves``, ``first`` of them (``None``: ``n // 2 + 1``) and then ``step``
    at a time while the vote is unsettled, instead of all at once."""

    rule: str
    waves: bool = False
    first: Optional[int] = None
    step: int = 2

    @classmethod
    def coerce(cls, stop: Any) -> "StopPlan":
        """A plan from what ``Workload.run`` may be given: a plan, or a rule's name."""
        return cls(stop) if isinstance(stop, str) else stop

    @classmethod
    def of(cls, mode) -> Optional["StopPlan"]:
        """A bench mode's plan; ``None`` for a mode that stops no branch."""
        return cls(mode.stop, waves=mode.waves) if mode.stop else None

    def with_params(self, params: Dict[str, Any]) -> "StopPlan":
        """The plan with a workload's ``waves_first``/``waves_step`` (see :data:`WAVES_DEFAULTS`)."""
        if not self.waves:
            return self
        return dataclasses.replace(self, first=params["waves_first"] or None, step=params["waves_step"])


def check_modes(workload: Workload, modes) -> None:
    """Refuse a waves mode on a workload whose program does not launch its branches in waves."""
    waving = [m.label for m in modes if m.waves]
    if waving and not workload.waves:
        raise ValueError(f"workload {workload.name!r} does not launch seeded branches in waves, so mode(s) "
                         f"{', '.join(waving)} cannot run on it; they run with "
                         f"{', '.join(w.name for w in WORKLOADS.values() if w.waves)}")


WORKLOADS: Dict[str, Workload] = {}


def register(cls):
    """Class decorator: make a :class:`Workload` available by its ``name``."""
    WORKLOADS[cls.name] = cls()
    return cls


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name]


def parse_workloads(text: str) -> List[Workload]:
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no workload given; choose from {', '.join(WORKLOADS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"a workload is given twice in {text!r}")
    return [get_workload(n) for n in names]


def speedup(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    def value(result):
        return result["speedups"].get(base, {}).get(mode, {}).get("ratio")
    return value


def speedup_ci(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[Sequence[float]]]:
    """The 95% paired bootstrap interval of :func:`speedup`."""
    def interval(result):
        return result["speedups"].get(base, {}).get(mode, {}).get("ci95")
    return interval


def speedup_target(name: str, base: str, mode: str, threshold: float) -> Target:
    """``mode`` at least ``threshold`` x as fast as ``base``, judged on the speedup's interval."""
    return Target(name, speedup(base, mode), ">=", threshold, speedup_ci(base, mode))


def mode_target(name: str, mode: str, field: str, op: str, threshold: float, interval_field: str) -> Target:
    """A per-mode rate (agreement, error rate) judged on its interval (``interval_field``: its
    95% Wilson interval in the mode's summary)."""
    return Target(name, mode_field(mode, field), op, threshold, mode_field(mode, interval_field))


def _not_slower(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """The upper end of the speedup's interval: below 1 means slower beyond noise."""
    def value(result):
        s = result["speedups"].get(base, {}).get(mode)
        return None if s is None else s["ci95"][1]
    return value


def mode_field(mode: str, field: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    def value(result):
        return result["modes"].get(mode, {}).get(field)
    return value


def fewer_prefill(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """How many times fewer prompt tokens ``mode`` computed than ``base`` (run totals)."""
    def value(result):
        modes = result["modes"]
        if base not in modes or mode not in modes or not modes[mode]["prefill_tokens_total"]:
            return None
        return modes[base]["prefill_tokens_total"] / modes[mode]["prefill_tokens_total"]
    return value


def hit_rate_margin(mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """``mode``'s hit rate minus the best other mode's (>= 0: the highest, ties included)."""
    def value(result):
        modes = result["modes"]
        others = [s["hit_rate"] for name, s in modes.items() if name != mode]
        return None if mode not in modes or not others else modes[mode]["hit_rate"] - max(others)
    return value


NOT_SLOWER_THAN_RADIX = Target("rksc not slower than radix (upper 95% CI of radix/rksc)",
                               _not_slower("radix", "rksc"), ">=", 1.0)
