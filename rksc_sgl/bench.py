"""``rksc-sgl bench``: cache modes compared on reasoning workloads, in one process.

    rksc-sgl bench --workload paper --modes none,radix,rksc --problems 8 --seed 0

Pieces, each small and registered by name:

- **Modes** (:data:`MODES`): what ``Engine(...)`` gets and whether the verify step runs
  CGEE's gates. ``none`` (no reuse), ``radix`` (SGLang's stock ``RadixCache``, LRU), ``rksc``
  (ASKS + CGEE + RSBCM) and each RKSC component alone: ``asks``, ``cgee``, ``rsbcm``. An
  ASKS mode may carry its own threshold, ``asks@0.9``, so one run can sweep tau.
- **Workloads** (:data:`WORKLOADS`): ``paper`` (a ~1000-token prompt shared by 8 branches
  with different approach hints, 32 new tokens each, then a verify step), ``cot``
  (self-consistency, 8 branches x 256 tokens, majority vote), ``tot`` (the tree-of-thought
  program of ``programs/``), ``paraphrase`` (ASKS: one problem asked under several
  paraphrased instructions) and ``pressure`` (RSBCM: concurrent multi-branch programs sharing
  a few-shot prefix, with the KV pool at a fraction of their working set). Every parameter
  of a workload can be overridden (``--branches``, ``--max-tokens``, ...).
- **Runner** (:func:`run_bench`): one engine per mode, built once, used sequentially (never
  two modes at once) and integrity-checked, then shut down. With ``--backend runtime`` each
  mode is instead a real SGLang server (``rksc_sgl.runtime.bench_servers``: ``none`` =
  ``--disable-radix-cache``, ``radix`` = SGLang's default cache, ``radix-stock`` = its
  ``RadixCache`` class, ``rksc``/``rsbcm`` = the ``rksc`` backend with RSBCM and its
  attention hook), started, used for every problem and ended before the next mode's. Warm-up problems run first on
  every mode and are dropped. Then for each problem and repeat every mode runs once, in an
  order that rotates, so drift on a shared machine hits all modes alike. Caches are flushed
  before every program (reuse happens inside a program) unless the workload says otherwise.
  Generation is greedy by default, so two exact caches give the same text and "agreement
  with radix" measures what a mode changed, not the sampler.
- **Statistics**: per problem the median over repeats; per mode medians with the
  interquartile range; speedups are ratios of medians (``none`` or ``radix`` over the mode)
  with a paired bootstrap confidence interval over problems (:func:`bootstrap_ratio_ci`).
  CGEE modes run their verify step with ``audit_fraction`` (default 1): a call whose gates
  changed something also runs the full pass, to count errors (decisions that differ from the
  full pass, over verify calls); that audit pass's time is measured and left out of the
  mode's time.
- **Report**: JSON (configuration, the command, versions, CPU, threads, every run), a
  markdown table and a PNG (speedups with error bars, hit tokens, fidelity against tau),
  written as ``bench_<workload>.{json,md,png}``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import operator
import random
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from .config import DTYPES
from .problems import (CHAIN_STOP, DIFFICULTY_LEVELS, SYSTEM_PROMPT, Problem, extract_answer, load_problems,
                       majority_vote, question_prompt, score)
from .report import bootstrap_mean_ci, format_table, markdown_table, median, pyplot, run_record, save_and_report, save_figure

if TYPE_CHECKING:  # imported where used: they import torch and SGLang
    from .cgee import AuditLog, CGEEConfig, VerifyResult

PROGRAMS_DIR = Path(__file__).resolve().parents[1] / "programs"
DEFAULT_OUT_DIR = "benchmarks/results"
WARMUP_SEED_OFFSET = 100_000
"""Warm-up problems come from seed ``seed + WARMUP_SEED_OFFSET``: never a timed problem."""


# ---- inputs (shared with benchmarks/bench_engine.py) -------------------------------------------
HINTS = [
    "Approach: set up an equation for the unknown and solve it.",
    "Approach: work backwards from what the question asks for.",
    "Approach: list every quantity first, then combine them one at a time.",
    "Approach: estimate the answer roughly, then compute it exactly.",
    "Approach: draw a small table of before/after amounts.",
    "Approach: split the problem into two smaller sub-problems.",
    "Approach: compute each person's or item's total separately, then add.",
    "Approach: check units and percentages carefully at every step.",
]


def hints_for(n: int) -> List[str]:
    """``n`` distinct approach hints (the list repeats with a variant number past 8)."""
    return [HINTS[i % len(HINTS)] + (f" (variant {i // len(HINTS) + 1})" if i >= len(HINTS) else "")
            for i in range(n)]


NEXT_QUESTION = "\n\nQuestion:"
"""Where a few-shot answer ends: the model goes on with the next question."""
FEW_SHOT_HEADER = "Solve each math word problem. Reason step by step, then give the final answer.\n\n"


def few_shot_problem(tokenizer, prompt_tokens: int, seed: int) -> Tuple[str, Problem]:
    """A deterministic few-shot prompt of about ``prompt_tokens`` tokens ending in a new
    problem, and that problem. Worked examples come from reasoning-gym ``gsm_symbolic``
    (seeded); the example block is cut at a token boundary so the total is close to the
    target."""
    data = load_problems("gsm_symbolic", count=64, seed=seed)
    target = data[0]
    tail = f"\n\nQuestion: {target.question}\nAnswer: Let's think step by step.\n"

    def n_tok(text: str) -> int:
        return len(tokenizer.encode(text, add_special_tokens=False))

    budget = prompt_tokens - n_tok(FEW_SHOT_HEADER) - n_tok(tail)
    shots, used = [], 0
    for item in data[1:]:
        shot = f"Question: {item.question}\nAnswer: {item.entry['metadata'].get('answer_cot', '')}\n" \
               f"Final answer: {item.answer}\n\n"
        shots.append(shot)
        used += n_tok(shot)
        if used >= budget:
            break
    block_ids = tokenizer.encode("".join(shots), add_special_tokens=False)[: max(budget, 0)]
    block = tokenizer.decode(block_ids).rstrip()
    return FEW_SHOT_HEADER + block + tail, target


def build_prompt(tokenizer, prompt_tokens: int, seed: int) -> str:
    """The prompt of :func:`few_shot_problem` alone."""
    return few_shot_problem(tokenizer, prompt_tokens, seed)[0]


def extract_final(text: Optional[str]) -> Optional[str]:
    """The answer of a few-shot continuation: the text up to the next example's
    ``Question:`` (the model tends to go on with a new one), then :func:`extract_answer`."""
    if text is None:
        return None
    return extract_answer(text.split("\nQuestion:", 1)[0])


_PROGRAMS: Dict[str, Any] = {}


def program(name: str):
    """The benchmark's SGLang programs by name (``hinted_branches``, ``paraphrased_question``).

    They are defined on first use, so that importing this module (``rksc-sgl --help``)
    does not import SGLang, which takes seconds.
    """
    if not _PROGRAMS:
        _define_programs()
    return _PROGRAMS[name]


def _define_programs() -> None:
    import sglang as sgl

    from .branch_stop import seed_branches, vote
    from .cgee import verify

    @sgl.function
    def hinted_branches(s, prompt: str, hints: List[str], max_tokens: int, fork_commit: bool = False,
                        sample_temperature: float = 0.0, verify_config: Optional["CGEEConfig"] = None,
                        audit_log: Any = None,
                        extract: Callable[[str], Optional[str]] = extract_final,
                        stop_rule: Optional[str] = None, until_answer: bool = False) -> Dict[str, Any]:
        """One shared prompt, ``len(hints)`` branches with one approach hint each, exactly
        ``max_tokens`` new tokens per branch, then (with ``verify_config``) ``rksc_sgl.verify``.

        (``sample_temperature``, not ``temperature``: ``SglFunction.run`` takes a
        ``temperature`` of its own, as a default for every gen, and never passes it on.)

        SGLang's ``fork`` commits the text so far as a prefill-only request, but only if the
        interpreter thread has already applied it (``StreamExecutor.fork`` tests ``text_``
        before it syncs), which is a race. Both variants below are deterministic:
        ``fork_commit=False`` forks first and appends the shared prompt in every branch (no
        commit request; the engine sees exactly ``len(hints)`` requests); ``fork_commit=True``
        syncs before forking, so the prefix is always committed first (one extra request).
        With ``stop_rule``, ``rksc_sgl.vote`` stops branches once their vote is settled (the
        verify step then sees the vote). Every branch decodes exactly ``max_tokens``, so they
        all finish at the same step and none is ever stopped, unless ``until_answer``: then a
        branch ends where the few-shot format starts the next question (``\n\nQuestion:``),
        or at ``max_tokens``.
        Returns ``{"completion_tokens": [...], "verify": VerifyResult or None, "vote": BranchVote
        or None}``; the branches' texts are gathered into ``s["answer"]`` by the join.
        """
        if fork_commit:
            s += prompt
            s.sync()
            forks = s.fork(len(hints))
            shared = ""
        else:
            forks = s.fork(len(hints))
            shared = prompt
        for f, hint in zip(forks, hints):
            f += shared + hint + "\n"
            if until_answer:
                f += sgl.gen("answer", max_tokens=max_tokens, stop=[NEXT_QUESTION], temperature=sample_temperature)
            else:
                f += sgl.gen("answer", max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True,
                             temperature=sample_temperature)
        voted = vote(forks, "answer", rule=stop_rule, extract=extract) if stop_rule else None
        metas = [f.get_meta_info("answer") for f in forks]  # waits for every branch
        checked = None
        if verify_config is not None:
            checked = verify(forks, answer="answer", config=verify_config, audit_log=audit_log, extract=extract,
                             branch_vote=voted)
        forks.join()  # gathers the branches' "answer" into a list on s
        return {"completion_tokens": [m["completion_tokens"] for m in metas], "verify": checked, "vote": voted}

    @sgl.function
    def seeded_vote(s, question: str, branches: int, max_tokens: int, sample_temperature: float, seed: int,
                    stop_rule: Optional[str] = None, verify_config: Optional["CGEEConfig"] = None,
                    audit_log: Any = None) -> Dict[str, Any]:
        """The ``vote`` and ``serve`` workloads' program: self-consistency over ``branches``
        sampled chains, branch i seeded ``seed + i`` (the same samples in every mode), each
        ending at its first paragraph; with ``stop_rule``, ``rksc_sgl.vote`` stops the rest
        once settled; with ``verify_config``, best-of-N: ``rksc_sgl.verify`` picks the answer."""
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(question_prompt(question))
        s.sync()  # the shared prompt is committed before the fork, every time (see hinted_branches)
        forks = s.fork(branches)
        seed_branches(forks, seed)
        forks += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=sample_temperature,
                                       stop=list(CHAIN_STOP)))
        voted = vote(forks, "answer", rule=stop_rule) if stop_rule else None
        texts = [f["answer"] for f in forks]
        answer = voted.answer if voted else majority_vote([extract_answer(t) for t in texts])
        checked = None
        if verify_config is not None:  # best-of-N: the verifier picks among the (finished) branches
            checked = verify(forks, answer="answer", config=verify_config, audit_log=audit_log, branch_vote=voted)
            answer = checked.answer
        return {"answer": answer, "texts": texts, "vote": voted, "verify": checked}

    @sgl.function
    def paraphrased_question(s, question: str, instruction: str, max_tokens: int, sample_temperature: float = 0.0):
        """The ``paraphrase`` workload's program: one problem under one instruction wording."""
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(f"{instruction} {question_prompt(question)}")
        s += sgl.assistant(sgl.gen("answer", max_tokens=max_tokens, temperature=sample_temperature,
                                   stop=list(CHAIN_STOP)))

    @sgl.function
    def restated_check(s, question: str, reasoning: str):
        """The ``paraphrase`` workload's verifier turn: a fresh prompt that restates one
        wording's reasoning and asks for a YES/NO judgement (one greedy token)."""
        s += sgl.system(SYSTEM_PROMPT)
        s += sgl.user(f"Check this solution.\nProblem: {question.strip()}\nSolution: {reasoning.strip()}\n"
                      "Is the solution correct? Answer Yes or No.")
        s += sgl.assistant(sgl.gen("verdict", max_tokens=1, temperature=0.0))

    _PROGRAMS.update(hinted_branches=hinted_branches, paraphrased_question=paraphrased_question,
                     restated_check=restated_check, seeded_vote=seeded_vote)


PARAPHRASES = [
    "Solve this problem.",
    "Answer this question.",
    "Work out this problem.",
    "Calculate the result.",
    "Find the answer.",
    "Please solve this.",
    "Compute this problem.",
    "Figure this out.",
]


def _load_program(name: str):
    """``programs/NAME.py`` of the repository as a module (loaded once)."""
    key = f"rksc_sgl_bench_program_{name}"
    if key in sys.modules:
        return sys.modules[key]
    path = PROGRAMS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"this workload runs {path}, which is not there (programs/ of the rksc-sgl "
                                "repository; an installed wheel does not carry it)")
    spec = importlib.util.spec_from_file_location(key, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module
    spec.loader.exec_module(module)
    return module


# ---- modes ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Mode:
    """A cache mode: the engine it needs and whether the verify step uses CGEE's gates."""

    name: str
    cache: str
    asks: bool = False
    cgee: bool = False
    rsbcm: bool = False
    help: str = ""
    tau: Optional[float] = None
    """An ASKS threshold of this mode alone (``asks@0.9``); ``None``: the run's ``asks_tau``."""
    eviction: Optional[str] = None
    """Another of SGLang's eviction policies for the stock tree (``lfu``, ``slru``)."""
    key_layer: Optional[int] = None
    """An ASKS key layer of this mode alone (``asks@0.9:L4``); ``None``: the run's ``asks_key_layer``."""
    stop: Optional[str] = None
    """The branch-stop rule (``rksc_sgl.vote``) of the workloads that vote over forks."""

    @property
    def label(self) -> str:
        label = self.name if self.tau is None else f"{self.name}@{self.tau:g}"
        return label if self.key_layer is None else f"{label}:L{self.key_layer}"

    def engine_kwargs(self, settings: "BenchSettings") -> Dict[str, Any]:
        kwargs: Dict[str, Any] = {"cache": self.cache}
        if self.asks:
            kwargs["asks"] = {"enabled": True, "tau": self.tau if self.tau is not None else settings.asks_tau,
                              "recompute_fraction": settings.asks_recompute,
                              "key_layer": self.key_layer if self.key_layer is not None else settings.asks_key_layer}
        if self.rsbcm:
            kwargs["eviction_policy"] = "rsbcm"
        elif self.eviction:
            kwargs["eviction_policy"] = self.eviction
        return kwargs

    def effective_tau(self, settings: "BenchSettings") -> Optional[float]:
        if not self.asks:
            return None
        return self.tau if self.tau is not None else settings.asks_tau


MODES: Dict[str, Mode] = {m.name: m for m in (
    Mode("none", "none", help="no KV reuse between requests"),
    Mode("radix", "radix", help="SGLang's stock RadixCache, LRU eviction (runtime: SGLang's default cache as "
                                "a user gets it, UnifiedRadixCache)"),
    Mode("radix-stock", "radix", help="SGLang's RadixCache class, LRU (the engine's radix; in the runtime "
                                      "--radix-cache-backend radix-stock)"),
    Mode("rksc", "rksc", asks=True, cgee=True, rsbcm=True, stop="lossless",
         help="ASKS + CGEE + RSBCM, and lossless branch stop where a workload votes over forks"),
    Mode("asks", "rksc", asks=True, help="RKSC cache with ASKS semantic reuse only (LRU)"),
    Mode("cgee", "radix", cgee=True, help="stock radix cache, CGEE gates in the verify step"),
    Mode("rsbcm", "rksc", rsbcm=True, help="RKSC cache, exact matching, RSBCM eviction"),
    Mode("lfu", "radix", eviction="lfu", help="SGLang's stock RadixCache, LFU eviction (for pressure)"),
    Mode("slru", "radix", eviction="slru", help="SGLang's stock RadixCache, SLRU eviction (for pressure)"),
    *(Mode(f"stop-{rule}", "radix", stop=rule, help=f"stock radix cache, branch stop by the {rule!r} rule "
                                                   "(workloads that vote over forks)")
      for rule in ("lossless", "beta", "window")),
)}


def parse_modes(text: str) -> List[Mode]:
    """``"none,radix,rksc,asks@0.9,asks@0.9:L4"`` -> modes; ``ValueError`` naming what is wrong."""
    names = [t.strip() for t in str(text).split(",") if t.strip()]
    if not names:
        raise ValueError(f"no modes given; choose from {', '.join(MODES)}")
    modes: List[Mode] = []
    for spec in names:
        head, _, layer_text = spec.partition(":")
        name, _, tau_text = head.partition("@")
        if name not in MODES:
            raise ValueError(f"unknown mode {name!r}; choose from {', '.join(MODES)} (ASKS modes take "
                             "a threshold as NAME@TAU and a key layer as :L<layer>, e.g. asks@0.9:L4)")
        mode = MODES[name]
        if layer_text:
            if not mode.asks:
                raise ValueError(f"mode {name!r} does not use ASKS, so {spec!r} has no key layer to set")
            if not (layer_text.startswith("L") and layer_text[1:].isdigit()):
                raise ValueError(f"mode {spec!r}: the key layer is written :L<layer>, e.g. :L4")
            mode = dataclasses.replace(mode, key_layer=int(layer_text[1:]))
        if tau_text:
            if not mode.asks:
                raise ValueError(f"mode {name!r} does not use ASKS, so {spec!r} has no tau to set")
            try:
                tau = float(tau_text)
            except ValueError:
                raise ValueError(f"mode {spec!r}: tau {tau_text!r} is not a number") from None
            if not math.isfinite(tau) or tau < -1.0:
                raise ValueError(f"mode {spec!r}: tau must be a finite number >= -1")
            mode = dataclasses.replace(mode, tau=tau)
        if any(m.label == mode.label for m in modes):
            raise ValueError(f"mode {mode.label!r} is given twice")
        modes.append(mode)
    return modes


# ---- settings --------------------------------------------------------------------------------
BACKENDS = ("engine", "runtime")

@dataclasses.dataclass
class BenchSettings:
    """Everything a run depends on besides the workload and modes (all recorded in the JSON)."""

    problems: int = 4
    seed: int = 0
    repeats: int = 1
    warmup: int = 1
    model: str = "smollm2-135m"
    threads: int = 1
    device: str = "cpu"
    """Where the engines run (``cpu``, ``cuda``, ``auto``); CPU timings are the protocol's."""
    dtype: str = "auto"
    """The engines' dtype (``auto``: the engine's default, float32 on the CPU and bfloat16 on
    CUDA); ``bfloat16`` on the CPU reproduces a GPU run's rounding where the CPU can."""
    kv_pool_tokens: int = 16384
    max_running_requests: int = 64
    asks_tau: float = 0.95  # the ASKS defaults (ASKSConfig's, chosen from this benchmark;
    asks_recompute: float = 0.5  # a test keeps them equal; literal here, since rksc_cache
    asks_key_layer: int = 0  # imports SGLang)
    audit_fraction: float = 1.0
    bootstrap: int = 2000
    params: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Overrides of the workload's parameters (``branches``, ``max_tokens``, ...)."""
    backend: str = "engine"
    """``engine``: every mode on an embedded engine in this process; ``runtime``: every mode as
    a real SGLang server (``rksc_sgl.runtime.bench_servers``), one after another."""
    server_args: str = ""
    """Further SGLang flags for every mode's server (``--backend runtime``), e.g.
    ``--schedule-policy lpm``."""

    def __post_init__(self) -> None:
        for name in ("problems", "repeats", "threads", "kv_pool_tokens", "max_running_requests", "bootstrap"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {value!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.server_args and self.backend != "runtime":
            raise ValueError("server-args are SGLang server flags: they need --backend runtime")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.warmup, int) or isinstance(self.warmup, bool) or self.warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0, got {self.warmup!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not (isinstance(self.asks_tau, (int, float)) and math.isfinite(self.asks_tau) and self.asks_tau >= -1):
            raise ValueError(f"asks-tau must be a finite number >= -1, got {self.asks_tau!r}")
        if not isinstance(self.asks_key_layer, int) or isinstance(self.asks_key_layer, bool) or self.asks_key_layer < 0:
            raise ValueError(f"asks-key-layer must be an integer >= 0, got {self.asks_key_layer!r}")
        if not 0.0 <= self.asks_recompute <= 1.0:
            raise ValueError(f"asks-recompute must be in [0, 1], got {self.asks_recompute!r}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit-fraction must be in [0, 1], got {self.audit_fraction!r}")


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


@dataclasses.dataclass(frozen=True)
class Target:
    """A pass/fail line of the report: ``value(result)`` compared with ``threshold``."""

    name: str
    value: Callable[[Dict[str, Any]], Optional[float]]
    op: str  # ">=", ">" or "<="
    threshold: float

    def check(self, result: Dict[str, Any]) -> Dict[str, Any]:
        v = self.value(result)
        compare = {">=": operator.ge, ">": operator.gt, "<=": operator.le}[self.op]
        ok = None if v is None else compare(v, self.threshold)
        return {"name": self.name, "value": v, "target": f"{self.op} {self.threshold:g}", "ok": ok}


class Workload:
    """A registered workload: its parameters, problems, program and targets."""

    name = ""
    help = ""
    defaults: Dict[str, Any] = {}
    has_verify = False
    flush_between_problems = True
    votes = False
    """Whether its program votes over forks, so a mode's branch-stop rule applies."""

    def resolve(self, overrides: Dict[str, Any]) -> Dict[str, Any]:
        """The workload's parameters with ``overrides`` applied (unknown names are an error)."""
        unknown = sorted(k for k, v in overrides.items() if v is not None and k not in self.defaults)
        if unknown:
            raise ValueError(f"workload {self.name!r} has no parameter {', '.join(unknown)} "
                             f"(it takes: {', '.join(self.defaults)})")
        params = dict(self.defaults)
        params.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("branches", "max_tokens", "prompt_tokens", "keep", "expand", "programs", "prefixes", "clients"):
            if key in params and (not isinstance(params[key], int) or params[key] < 1):
                raise ValueError(f"{key.replace('_', '-')} must be a positive integer, got {params[key]!r}")
        if "pool_fraction" in params and not 0.0 < params["pool_fraction"] <= 1.0:
            raise ValueError(f"pool-fraction must be in (0, 1], got {params['pool_fraction']!r}")
        if "temperature" in params and not params["temperature"] >= 0:
            raise ValueError(f"temperature must be >= 0, got {params['temperature']!r}")
        return params

    def items(self, tokenizer, params: Dict[str, Any], seed: int, count: int) -> List[Item]:
        raise NotImplementedError

    def engine_overrides(self, tokenizer, params: Dict[str, Any], items: List[Item]) -> Dict[str, Any]:
        """Engine settings this workload needs (e.g. a small KV pool for ``pressure``)."""
        return {}

    def run(self, engine, item: Item, params: Dict[str, Any], cgee: Optional[CGEEConfig],
            audit_log: AuditLog, stop: Optional[str] = None) -> Outcome:
        """One program run; ``stop``: the mode's branch-stop rule (only where ``votes``)."""
        raise NotImplementedError

    def targets(self) -> List[Target]:
        return []


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


def _speedup(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    def value(result):
        return result["speedups"].get(base, {}).get(mode, {}).get("ratio")
    return value


def _not_slower(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """The upper end of the speedup's interval: below 1 means slower beyond noise."""
    def value(result):
        s = result["speedups"].get(base, {}).get(mode)
        return None if s is None else s["ci95"][1]
    return value


def _mode_field(mode: str, field: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    def value(result):
        return result["modes"].get(mode, {}).get(field)
    return value


def _fewer_prefill(base: str, mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """How many times fewer prompt tokens ``mode`` computed than ``base`` (run totals)."""
    def value(result):
        modes = result["modes"]
        if base not in modes or mode not in modes or not modes[mode]["prefill_tokens_total"]:
            return None
        return modes[base]["prefill_tokens_total"] / modes[mode]["prefill_tokens_total"]
    return value


def _hit_rate_margin(mode: str) -> Callable[[Dict[str, Any]], Optional[float]]:
    """``mode``'s hit rate minus the best other mode's (>= 0: the highest, ties included)."""
    def value(result):
        modes = result["modes"]
        others = [s["hit_rate"] for name, s in modes.items() if name != mode]
        return None if mode not in modes or not others else modes[mode]["hit_rate"] - max(others)
    return value


NOT_SLOWER_THAN_RADIX = Target("rksc not slower than radix (upper 95% CI of radix/rksc)",
                               _not_slower("radix", "rksc"), ">=", 1.0)


class _GymWorkload(Workload):
    """A workload over plain reasoning-gym problems (``dataset``/``difficulty`` parameters)."""

    def resolve(self, overrides):
        params = super().resolve(overrides)
        if params["difficulty"] not in DIFFICULTY_LEVELS:
            raise ValueError(f"difficulty must be one of {', '.join(DIFFICULTY_LEVELS)}, got {params['difficulty']!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        problems = load_problems(params["dataset"], count, seed, difficulty=params["difficulty"])
        return [Item(i, p) for i, p in enumerate(problems)]


def branch_seed(seed: int, program: int, branches: int) -> int:
    """The seed of program ``program``'s first branch (branch i: + i), distinct across the
    run's programs and the same in every mode."""
    return seed * 1000 + program * branches


def _vote_record(voted) -> Optional[Dict[str, Any]]:
    """What a run's ``rksc_sgl.vote`` decided, for its record (``None`` without one)."""
    if voted is None:
        return None
    return {"rule": voted.rule, "stopped": sorted(voted.stopped), "settled_after": voted.settled_after}


class _HintedWorkload(Workload):
    """``paper`` and ``cot``: :func:`hinted_branches` on a few-shot gsm_symbolic prompt."""

    votes = True

    def items(self, tokenizer, params, seed, count):
        out = []
        for i in range(count):
            prompt, problem = few_shot_problem(tokenizer, params["prompt_tokens"], seed + i)
            out.append(Item(i, problem, {"prompt": prompt, "prompt_tokens": len(tokenizer.encode(prompt))}))
        return out

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        state = program("hinted_branches").run(
            prompt=item.inputs["prompt"], hints=hints_for(params["branches"]), max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], verify_config=cgee if self.has_verify else None,
            audit_log=audit_log, stop_rule=stop, until_answer=bool(params.get("until_answer")), backend=engine)
        ret = state.ret_value
        if not isinstance(ret, dict):
            raise RuntimeError(f"workload {self.name!r}: the program failed: {ret!r}")
        outputs = list(state["answer"])
        voted = _vote_record(ret["vote"])
        if ret["verify"] is not None:
            checked: VerifyResult = ret["verify"]
            return Outcome(checked.answer, outputs, checked, float(checked.gates.get("audit_s") or 0.0), voted)
        if ret["vote"] is not None:
            return Outcome(ret["vote"].answer, outputs, vote=voted)
        return Outcome(majority_vote([extract_final(t) for t in outputs]), outputs)


@register
class PaperWorkload(_HintedWorkload):
    name = "paper"
    help = ("the original RKSC evaluation's shape: a ~1000-token prompt shared by 8 branches with different "
            "approach hints, 32 new tokens each, then a verify step (rksc_sgl.verify)")
    defaults = {"branches": 8, "max_tokens": 32, "prompt_tokens": 1000, "temperature": 0.0}
    has_verify = True

    def targets(self):
        return [Target("rksc speedup over none", _speedup("none", "rksc"), ">=", 3.0),
                Target("rksc speedup over radix", _speedup("radix", "rksc"), ">=", 1.66),
                Target("rksc answer agreement with radix", _mode_field("rksc", "agreement_with_radix"), ">=", 0.99),
                Target("rksc CGEE error rate (per verify call)", _mode_field("rksc", "cgee_error_rate"), "<=",
                       0.0037)]


@register
class CotWorkload(_HintedWorkload):
    name = "cot"
    help = ("self-consistency: the same few-shot prompt, 8 hinted branches x 256 new tokens, majority vote "
            "(until_answer=1: a branch ends where it starts the next question, so branch stop can end the rest)")
    defaults = {"branches": 8, "max_tokens": 256, "prompt_tokens": 1000, "temperature": 0.0, "until_answer": 0}

    def resolve(self, overrides):
        params = super().resolve(overrides)
        if params["until_answer"] not in (0, 1):
            raise ValueError(f"until-answer must be 0 or 1, got {params['until_answer']!r}")
        return params

    def targets(self):
        return [NOT_SLOWER_THAN_RADIX, Target("rksc speedup over radix (issue 19: >= 1.3x)", _speedup("radix", "rksc"),
                                              ">=", 1.3)]


@register
class TreeOfThoughtWorkload(_GymWorkload):
    name = "tot"
    help = ("tree of thought (programs/tree_of_thought.py): propose approaches, judge them with select, expand "
            "the best (forks inside forks), vote")
    defaults = {"branches": 3, "keep": 2, "expand": 2, "max_tokens": 96, "temperature": 0.0,
                "dataset": "basic_arithmetic", "difficulty": "easy"}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        tot = _load_program("tree_of_thought")
        state = tot.tree_of_thought.run(
            question=item.problem.question, num_branches=params["branches"], max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], keep=params["keep"], expand=params["expand"], backend=engine)
        result = state.ret_value
        if not isinstance(result, dict):
            raise RuntimeError(f"workload 'tot': the program failed: {result!r}")
        answers = [a for _, a in result["leaves"]]
        outputs = [a["text"] for a in result["approaches"]] + ["" if a is None else a for a in answers]
        return Outcome(majority_vote(answers), outputs)

    def targets(self):
        return [NOT_SLOWER_THAN_RADIX]


@register
class ParaphraseWorkload(_GymWorkload):
    name = "paraphrase"
    help = ("ASKS: each problem asked under several paraphrased instructions, one after another on a warm cache "
            "(the first wording is the donor), greedy, each followed (restate=1) by a verifier prompt that "
            "restates that wording's reasoning; the answer is the majority vote of the wordings")
    defaults = {"branches": 4, "max_tokens": 48, "temperature": 0.0, "dataset": "basic_arithmetic",
                "difficulty": "easy", "restate": 1}

    def resolve(self, overrides):
        params = super().resolve(overrides)
        if params["branches"] > len(PARAPHRASES):
            raise ValueError(f"workload 'paraphrase' has {len(PARAPHRASES)} wordings; branches must be <= that")
        if params["restate"] not in (0, 1):
            raise ValueError(f"restate must be 0 or 1, got {params['restate']!r}")
        return params

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        outputs = []
        for instruction in PARAPHRASES[: params["branches"]]:
            state = program("paraphrased_question").run(question=item.problem.question, instruction=instruction,
                                             max_tokens=params["max_tokens"], sample_temperature=params["temperature"],
                                             backend=engine)
            outputs.append(state["answer"])
        answer = majority_vote([extract_answer(t) for t in outputs])
        if params["restate"]:
            # Verifier prompts that restate each wording's reasoning: same template, so the
            # reasonings sit at the same positions after an exact prefix (ASKS's case).
            for reasoning in list(outputs):
                check = program("restated_check").run(question=item.problem.question, reasoning=reasoning,
                                                      backend=engine)
                outputs.append(check["verdict"])
        return Outcome(answer, outputs)

    def targets(self):
        # The bar the ASKS defaults are chosen by (run it on held-out seeds).
        return [Target("asks answer agreement with radix", _mode_field("asks", "agreement_with_radix"), ">=", 0.99),
                Target("asks: x fewer prefill tokens than radix (run totals)", _fewer_prefill("radix", "asks"),
                       ">", 1.0)]


@register
class VoteWorkload(_GymWorkload):
    name = "vote"
    help = ("self-consistency with branch stop: `branches` sampled chains of thought per problem (branch i of "
            "problem k seeded seed*1000 + k*branches + i, the same in every mode), each ending at its first "
            "paragraph, majority vote; stop-* modes (and rksc) stop the remaining branches once their rule "
            "settles the vote")
    # easy: the packaged model answers it often (medium's answers are mostly wrong and
    # scattered, so no vote settles; see the README's branch-stop measurements).
    defaults = {"branches": 8, "max_tokens": 128, "temperature": 0.7, "dataset": "basic_arithmetic",
                "difficulty": "easy"}
    votes = True

    def items(self, tokenizer, params, seed, count):
        return [dataclasses.replace(item, inputs={"seed": branch_seed(seed, item.index, params["branches"])})
                for item in super().items(tokenizer, params, seed, count)]

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        state = program("seeded_vote").run(
            question=item.problem.question, branches=params["branches"], max_tokens=params["max_tokens"],
            sample_temperature=params["temperature"], seed=item.inputs["seed"], stop_rule=stop, backend=engine)
        ret = state.ret_value
        if not isinstance(ret, dict):
            raise RuntimeError(f"workload 'vote': the program failed: {ret!r}")
        return Outcome(ret["answer"], ret["texts"], vote=_vote_record(ret["vote"]))

    def targets(self):
        return [Target("stop-lossless voted answer agrees with radix", _mode_field("stop-lossless",
                                                                                 "agreement_with_radix"), ">=", 1.0)]


MALFORMED_PARAMS = ({"temperature": -1.0}, {"max_new_tokens": -5}, {"top_p": 2.0})
"""The sampling parameters of ``serve``'s malformed requests, taken in turn: each must be refused."""


def _is_engine(backend) -> bool:
    """The embedded engine (else SGLang's runtime, through ``RuntimeBackend``)."""
    from .engine import Engine

    return isinstance(backend, Engine)


def _disconnect(backend, text: str) -> None:
    """A client that reads two chunks of a streamed answer and goes away."""
    params = {"max_new_tokens": 64, "temperature": 0, "ignore_eos": True}
    if _is_engine(backend):  # closing the engine's stream cancels the request
        stream = backend.generate_request(text=text, sampling_params=params, stream=True)
        for _ in zip(range(2), stream):
            pass
        stream.close()
        return
    import requests

    with requests.post(backend.base_url + "/generate", json={"text": text, "sampling_params": params, "stream": True},
                       stream=True, timeout=60) as response:
        response.raise_for_status()
        for _ in zip(range(2), response.iter_lines()):
            pass  # leaving the block closes the connection: SGLang aborts the request


def _malformed(backend, params: Dict[str, Any]) -> bool:
    """Send a request with bad sampling parameters; whether it was refused."""
    if _is_engine(backend):
        try:
            backend.generate_request(text="Hello", sampling_params=params)
        except ValueError:
            return True
        return False
    import requests

    response = requests.post(backend.base_url + "/generate", json={"text": "Hello", "sampling_params": params},
                             timeout=60)
    return 400 <= response.status_code < 500


@register
class ServeWorkload(_GymWorkload):
    name = "serve"
    help = ("serving: each problem is a window of `programs` multi-branch programs (self-consistency and "
            "best-of-N with a verifier, alternating; seeded branches) that `clients` closed-loop clients run "
            "concurrently, on a KV pool of pool_fraction of those clients' working set, with faults mixed in: "
            "streams abandoned after two chunks (disconnect_share of the programs) and requests with bad "
            "sampling parameters (malformed_share); reports programs per second, program latency, errors by "
            "class and an integrity check after every window")
    defaults = {"programs": 8, "clients": 4, "branches": 4, "max_tokens": 64, "temperature": 0.7,
                "pool_fraction": 0.5, "disconnect_share": 0.25, "malformed_share": 0.25,
                "dataset": "basic_arithmetic", "difficulty": "easy"}
    votes = True
    has_verify = True

    def resolve(self, overrides):
        params = super().resolve(overrides)
        for key in ("disconnect_share", "malformed_share"):
            if not 0.0 <= params[key] <= 1.0:
                raise ValueError(f"{key.replace('_', '-')} must be in [0, 1], got {params[key]!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        k = params["programs"]
        problems = load_problems(params["dataset"], count * k, seed, difficulty=params["difficulty"])
        out = []
        for i in range(count):
            group = problems[i * k:(i + 1) * k]
            out.append(Item(i, group[0], {
                "problems": group, "seeds": [branch_seed(seed, i * k + j, params["branches"]) for j in range(k)],
                "prompt_tokens": max(len(tokenizer.encode(question_prompt(p.question))) for p in group)}))
        return out

    def engine_overrides(self, tokenizer, params, items):
        # The working set of `clients` programs at once: each one's prompt (plus its chat
        # template) and every branch's tokens, plus the verify turn of best-of-N.
        per_program = max(it.inputs["prompt_tokens"] for it in items) + 48 + params["branches"] * (
            params["max_tokens"] + 24)
        need = params["clients"] * per_program
        return {"kv_pool_tokens": max(int(need * params["pool_fraction"]), 2 * per_program)}

    def jobs(self, item, params) -> List[Tuple[str, int]]:
        """The window's work in the order clients take it: programs, with the faults spread in."""
        k = params["programs"]
        jobs = [("program", j) for j in range(k)]
        jobs += [("disconnect", j) for j in range(round(params["disconnect_share"] * k))]
        jobs += [("malformed", j) for j in range(round(params["malformed_share"] * k))]
        random.Random(item.index).shuffle(jobs)
        return jobs

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        from concurrent.futures import ThreadPoolExecutor

        problems, seeds = item.inputs["problems"], item.inputs["seeds"]

        def do(job):
            kind, j = job
            t0 = time.perf_counter()
            if kind == "disconnect":
                _disconnect(engine, f"Tell a long story about the number {j}.")
                return kind, j, None, time.perf_counter() - t0
            if kind == "malformed":
                return kind, j, _malformed(engine, MALFORMED_PARAMS[j % len(MALFORMED_PARAMS)]), 0.0
            try:
                state = program("seeded_vote").run(
                    question=problems[j].question, branches=params["branches"], max_tokens=params["max_tokens"],
                    sample_temperature=params["temperature"], seed=seeds[j], stop_rule=stop,
                    verify_config=cgee if j % 2 else None, audit_log=audit_log, backend=engine)
            except Exception as exc:  # a failed program is an error of its class, not the end of the run
                return kind, j, exc, time.perf_counter() - t0
            return kind, j, state.ret_value, time.perf_counter() - t0

        with ThreadPoolExecutor(max_workers=params["clients"]) as pool:
            done = list(pool.map(do, self.jobs(item, params)))
        return self._outcome(engine, problems, done)

    @staticmethod
    def _outcome(engine, problems, done) -> Outcome:
        rets: Dict[int, Any] = {}
        latency: Dict[int, float] = {}
        errors = {"disconnected": 0, "malformed_refused": 0, "malformed_accepted": 0, "program_failed": 0}
        failures: List[str] = []
        for kind, j, value, seconds in done:
            if kind == "disconnect":
                errors["disconnected"] += 1
            elif kind == "malformed":
                errors["malformed_refused" if value else "malformed_accepted"] += 1
            elif isinstance(value, dict):
                rets[j], latency[j] = value, seconds
            else:
                errors["program_failed"] += 1
                failures.append(f"program {j}: {value!r}")
        try:
            engine.check_integrity()
            integrity = None
        except Exception as exc:  # recorded, and the report says it
            integrity = f"{type(exc).__name__}: {exc}"
        answers = [rets[j]["answer"] if j in rets else None for j in range(len(problems))]
        stopped = [len(rets[j]["vote"].stopped) for j in rets if rets[j]["vote"] is not None]
        extra = {"programs": len(problems), "program_latency_s": [latency[j] for j in sorted(latency)],
                 "program_answers": answers,
                 "program_correct": [bool(a is not None and score(p, a) >= 1.0) for p, a in zip(problems, answers)],
                 "errors": errors, "program_failures": failures, "integrity_error": integrity,
                 "branches_stopped_in_window": sum(stopped)}
        outputs = [t for j in sorted(rets) for t in rets[j]["texts"]]
        return Outcome(answers[0], outputs, extra=extra)

    def targets(self):
        return [Target("rksc programs per second over radix's (pressured pool)", _speedup("radix", "rksc"), ">=",
                       1.66),
                Target("rksc programs' voted answers agreeing with radix's", _mode_field("rksc",
                                                                                   "program_agreement_with_radix"),
                       ">=", 0.97)]


@register
class PressureWorkload(Workload):
    name = "pressure"
    help = ("RSBCM: each problem is a batch of concurrent multi-branch programs that share a few-shot prefix "
            "(programs x branches hinted branches), on a KV pool of pool_fraction of the run's working set; "
            "problems cycle through `prefixes` different few-shot blocks and the cache is kept across "
            "problems, so what eviction kept decides the hits")
    defaults = {"programs": 2, "branches": 4, "max_tokens": 32, "prompt_tokens": 600, "pool_fraction": 0.25,
                "prefixes": 3, "temperature": 0.0}
    flush_between_problems = False

    def items(self, tokenizer, params, seed, count):
        # ``prefixes`` few-shot blocks (seeds seed, seed+1, ...); problem i uses block
        # i % prefixes, so a block comes back after the others were used, and whether it is
        # still cached is what the eviction policy decided meanwhile.
        blocks = []
        for b in range(params["prefixes"]):
            prompt, _ = few_shot_problem(tokenizer, params["prompt_tokens"], seed + 7919 * b)
            blocks.append(prompt.rsplit("\n\nQuestion: ", 1)[0] + "\n\n")
        out = []
        questions = load_problems("gsm_symbolic", count * params["programs"], seed + 1)
        for i in range(count):
            shared = blocks[i % len(blocks)]
            group = questions[i * params["programs"]:(i + 1) * params["programs"]]
            prompts = [f"{shared}Question: {q.question}\nAnswer: Let's think step by step.\n" for q in group]
            out.append(Item(i, group[0], {"prompts": prompts, "shared_tokens": len(tokenizer.encode(shared)),
                                          "block": i % len(blocks),
                                          "prompt_tokens": [len(tokenizer.encode(p)) for p in prompts]}))
        return out

    def working_set(self, params, items: List[Item], tokenizer) -> int:
        """Distinct KV tokens of all the run's programs: each few-shot block once, each program's
        question, and every branch's hint and new tokens."""
        if not items:
            return 0
        hint = max(len(tokenizer.encode(h + "\n")) for h in hints_for(params["branches"]))
        per_branch = hint + params["max_tokens"]
        blocks = {item.inputs["block"]: item.inputs["shared_tokens"] for item in items}
        total = sum(blocks.values())
        for item in items:
            shared = item.inputs["shared_tokens"]
            for n in item.inputs["prompt_tokens"]:
                total += (n - shared) + params["branches"] * per_branch
        return total

    def engine_overrides(self, tokenizer, params, items):
        need = self.working_set(params, items, tokenizer)
        longest = max(n for it in items for n in it.inputs["prompt_tokens"]) + 32 + params["max_tokens"]
        return {"kv_pool_tokens": max(int(need * params["pool_fraction"]), longest * 2)}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        hints = hints_for(params["branches"])
        states = program("hinted_branches").run_batch(
            [{"prompt": p, "hints": hints, "max_tokens": params["max_tokens"],
              "sample_temperature": params["temperature"]}
             for p in item.inputs["prompts"]], backend=engine, num_threads=len(item.inputs["prompts"]))
        outputs, answers = [], []
        for st in states:
            texts = list(st["answer"])
            outputs.extend(texts)
            answers.append(majority_vote([extract_final(t) for t in texts]))
        # The first program's problem is the item's; the others' answers count in the outputs.
        return Outcome(answers[0], outputs)

    def targets(self):
        # The issue's targets, stated for a pool of 25% of the working set.
        return [Target("rsbcm hit rate minus the best other mode's", _hit_rate_margin("rsbcm"), ">=", 0.0),
                Target("rsbcm: x fewer prefill tokens than LRU (radix; run totals; at pool 25%)",
                       _fewer_prefill("radix", "rsbcm"), ">=", 1.2)]


# ---- statistics ---------------------------------------------------------------------------------
def percentile(xs: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0..100), linear between order statistics (numpy's default)."""
    if not len(xs):
        return float("nan")
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def ratio_of_medians(base: Sequence[float], other: Sequence[float]) -> float:
    """``median(base) / median(other)``: how many times faster ``other`` is than ``base``."""
    m = median(other)
    return median(base) / m if m > 0 else float("nan")


def bootstrap_ratio_ci(base: Sequence[float], other: Sequence[float], samples: int = 2000, seed: int = 0,
                       level: float = 0.95) -> Tuple[float, float]:
    """Paired percentile bootstrap of :func:`ratio_of_medians` over problems.

    ``base[i]`` and ``other[i]`` are the same problem's times; each resample draws problem
    indices with replacement (``random.Random(seed).choices``) and keeps the pairs together.
    """
    if len(base) != len(other) or not base:
        raise ValueError("bootstrap needs two equally long, non-empty lists of per-problem times")
    rng = random.Random(seed)
    n = len(base)
    ratios = []
    for _ in range(samples):
        idx = rng.choices(range(n), k=n)
        ratios.append(ratio_of_medians([base[i] for i in idx], [other[i] for i in idx]))
    tail = (1.0 - level) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


def wilson(k: int, n: int) -> Tuple[float, float]:
    from .verifier import wilson_interval

    return wilson_interval(k, n)


def summarize_mode(records: List[Dict[str, Any]], problems: int) -> Dict[str, Any]:
    """Per-mode statistics from its timed runs (every problem x repeat)."""
    per_problem = []
    for p in range(problems):
        times = [r["time_s"] for r in records if r["problem"] == p]
        per_problem.append(median(times))
    first = [r for r in records if r["repeat"] == 0]

    def med(field):
        return median([r[field] for r in records])

    out: Dict[str, Any] = {
        "per_problem_s": per_problem,
        "median_s": median(per_problem), "p25_s": percentile(per_problem, 25), "p75_s": percentile(per_problem, 75),
        "min_s": min(per_problem), "max_s": max(per_problem), "mean_s": statistics.fmean(per_problem),
        "median_wall_s_incl_audit": median([r["wall_s"] for r in records]),
        "requests": med("requests"), "prefill_tokens": med("prefill_tokens"),
        "prefill_tokens_total": sum(r["prefill_tokens"] for r in records),
        "exact_hit_tokens": med("cached_tokens"), "semantic_hit_tokens": med("semantic_tokens"),
        "recomputed_tokens": med("recomputed_tokens"), "key_tokens": med("key_tokens"),
        "decode_tokens": med("decode_tokens"), "peak_kv_tokens": _median_or_none(records, "peak_kv_tokens"),
        "max_peak_kv_tokens": _max_or_none(records, "peak_kv_tokens"),
        "accuracy": statistics.fmean(1.0 if r["correct"] else 0.0 for r in first),
        "hit_rate": _hit_rate(records),
        "decode_tokens_total": sum(r["decode_tokens"] for r in records),
    }
    if records and "programs" in records[0]:
        out.update(_serve_summary(records))
    votes = [r["vote"] for r in records if r.get("vote")]
    if votes:
        out.update({"stop_rule": votes[0]["rule"], "branches_stopped": sum(len(v["stopped"]) for v in votes),
                    "runs_settled_early": sum(1 for v in votes if v["settled_after"] is not None)})
    calls = [r["verify"] for r in records if r.get("verify")]
    if calls:
        ran = [c for c in calls if not c["skipped"]]
        layers = [l for c in ran for l in (c["layers_run"] or [])]
        compared = [c for c in calls if not c["gated"] or c["audited"]]
        errors = sum(1 for c in compared if c["gated"] and c["audit_agrees"] is False)
        lo, hi = wilson(errors, len(compared))
        out.update({
            "verify_calls": len(calls), "verifier_passes_run": len(ran),
            "verifier_passes_skipped": len(calls) - len(ran),
            "verifier_passes_exited_early": sum(1 for c in ran if c["exited_early"]),
            "verifier_branches_exited_early": sum(c["exited_early"] for c in ran),
            "mean_exit_layer": statistics.fmean(layers) if layers else None,
            "num_layers": next((c["num_layers"] for c in ran if c["num_layers"]), None),
            "verifier_new_tokens": median([c["verifier_new_tokens"] or 0 for c in calls]),
            "median_verifier_s": median([c["verifier_s"] for c in calls]),
            "cgee_compared_calls": len(compared), "cgee_errors": errors,
            "cgee_error_rate": errors / len(compared) if compared else None, "cgee_error_ci95": [lo, hi],
        })
    return out


def _serve_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    """``serve``: programs per second over the windows' time, program latency percentiles,
    program accuracy, errors by class, and the windows whose integrity check failed."""
    latencies = [x for r in records for x in r["program_latency_s"]]
    correct = [c for r in records for c in r["program_correct"]]
    errors: Dict[str, int] = {}
    for r in records:
        for kind, n in r["errors"].items():
            errors[kind] = errors.get(kind, 0) + n
    return {"programs_per_s": sum(r["programs"] for r in records) / sum(r["time_s"] for r in records),
            "program_latency_p50_s": percentile(latencies, 50) if latencies else None,
            "program_latency_p90_s": percentile(latencies, 90) if latencies else None,
            "program_accuracy": statistics.fmean(correct) if correct else None,
            "errors": errors, "integrity_failures": [r["integrity_error"] for r in records if r["integrity_error"]]}


def _median_or_none(records: List[Dict[str, Any]], field: str) -> Optional[float]:
    """A counter's median, ``None`` where a backend does not measure it (the runtime's KV peak)."""
    values = [r[field] for r in records]
    return None if any(v is None for v in values) else median(values)


def _max_or_none(records: List[Dict[str, Any]], field: str) -> Optional[float]:
    values = [r[field] for r in records]
    return None if any(v is None for v in values) else max(values)


def _hit_rate(records: List[Dict[str, Any]]) -> float:
    """Prompt tokens served from the cache (exact or semantic) / all prompt tokens."""
    hits = sum(r["cached_tokens"] + r["semantic_tokens"] for r in records)
    total = hits + sum(r["prefill_tokens"] - r["recomputed_tokens"] for r in records)
    return hits / total if total else 0.0


def agreement(records: List[Dict[str, Any]], reference: List[Dict[str, Any]]) -> Tuple[float, float]:
    """``(answers, outputs)``: share of runs whose answer equals the reference run's answer on
    the same problem (its first repeat), and share of generated texts that are identical."""
    ref = {r["problem"]: r for r in reference if r["repeat"] == 0}
    answers = [r["answer"] == ref[r["problem"]]["answer"] for r in records]
    texts = [a == b for r in records for a, b in zip(r["outputs"], ref[r["problem"]]["outputs"])]
    return (statistics.fmean(answers) if answers else float("nan"),
            statistics.fmean(texts) if texts else float("nan"))


def paired_with_radix(records: List[Dict[str, Any]], reference: List[Dict[str, Any]], samples: int,
                      seed: int) -> Dict[str, Any]:
    """Against ``radix`` on the same problems (first repeats): answers agreeing, with a 95%
    Wilson interval; the accuracy change, with a 95% paired bootstrap interval over problems;
    decode tokens, ``radix``'s total over this mode's."""
    ref = {r["problem"]: r for r in reference if r["repeat"] == 0}
    mine = [r for r in records if r["repeat"] == 0]
    agree = sum(r["answer"] == ref[r["problem"]]["answer"] for r in mine)
    diffs = [float(r["correct"]) - float(ref[r["problem"]]["correct"]) for r in mine]
    decode = sum(r["decode_tokens"] for r in mine)
    programs = {}
    if mine and "program_answers" in mine[0]:
        pairs = [(a, b) for r in mine for a, b in zip(r["program_answers"], ref[r["problem"]]["program_answers"])]
        same = sum(a == b for a, b in pairs)
        programs = {"program_agreement_with_radix": same / len(pairs) if pairs else None,
                    "program_agreement_ci95": list(wilson(same, len(pairs)))}
    return {**programs, "agreement_with_radix_ci95": list(wilson(agree, len(mine))),
            "accuracy_change_vs_radix": statistics.fmean(diffs) if diffs else None,
            "accuracy_change_ci95": bootstrap_mean_ci(diffs, samples, seed) if diffs and samples else None,
            "fewer_decode_tokens_than_radix": (sum(ref[r["problem"]]["decode_tokens"] for r in mine) / decode
                                               if decode else None)}


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
             audit_log: AuditLog, stop: Optional[str] = None) -> Dict[str, Any]:
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
    if problems:
        raise ValueError(f"the engine given for mode {mode.label!r} does not match it: {'; '.join(problems)}")


def _tokenizer(model: str):
    """The tokenizer an engine of ``model`` would load (inputs are built before the engines)."""
    from transformers import AutoTokenizer

    from .config import default_cache_dir
    from .models import resolve_model_dir

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
    params = workload.resolve(settings.params)
    started = time.perf_counter()
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
        command or command_line(workload.name, modes, settings)))
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
    from .cgee import AuditLog, CGEEConfig

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

    from .engine import Engine

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
        cgee, audits = _cgee_configs(modes, settings)
        runs: Dict[str, List[Dict[str, Any]]] = {m.label: [] for m in modes}
        warm_runs: Dict[str, List[float]] = {m.label: [] for m in modes}
        total = len(modes) * (len(warm) + len(items) * settings.repeats)
        with _progress(workload, total, progress) as bar:
            for item in warm:
                for mode in modes:
                    bar.set_postfix_str(f"warm-up {mode.label}")
                    rec = run_once(used[mode.label], workload, item, params, cgee[mode.label], audits[mode.label],
                                   stop=mode.stop)
                    warm_runs[mode.label].append(rec["wall_s"])
                    bar.update()
            for step, (item, r) in enumerate(schedule(items, settings.repeats, workload.flush_between_problems)):
                if not workload.flush_between_problems and item is items[0]:
                    for engine in used.values():  # each pass over the problems starts from an empty cache
                        if not engine.flush_cache():
                            raise RuntimeError("could not flush an engine's cache")
                shift = step % len(modes)
                for mode in modes[shift:] + modes[:shift]:  # rotate who goes first
                    bar.set_postfix_str(f"problem {item.index + 1}/{len(items)} {mode.label}")
                    rec = run_once(used[mode.label], workload, item, params, cgee[mode.label], audits[mode.label],
                                   stop=mode.stop)
                    rec.update(problem=item.index, repeat=r)
                    runs[mode.label].append(rec)
                    bar.update()
        for label, engine in used.items():
            engine.check_integrity()
        engine_configs = {label: {k: str(v) for k, v in vars(e.config).items()} for label, e in used.items()}
    finally:
        for engine in owned.values():
            engine.shutdown()
    return runs, warm_runs, engine_configs, overrides, items


def _run_on_runtime(workload, modes, settings, params, progress):
    """Every mode as a real SGLang server (``rksc_sgl.runtime.bench_servers``), one after
    another, each serving the warm-up and all timed problems before the next starts."""
    from .runtime.bench_servers import mode_server, server_config, server_flags

    for mode in modes:  # refuse what the runtime cannot run before any server starts
        server_flags(mode, settings, {}, 0)
    warm, items, overrides = _inputs(workload, settings, params, _tokenizer(settings.model))
    cgee, audits = _cgee_configs(modes, settings)
    runs: Dict[str, List[Dict[str, Any]]] = {m.label: [] for m in modes}
    warm_runs: Dict[str, List[float]] = {m.label: [] for m in modes}
    configs: Dict[str, Dict[str, Any]] = {}
    total = len(modes) * (len(warm) + len(items) * settings.repeats)
    log_dir = Path(tempfile.mkdtemp(prefix="rksc-bench-servers-"))
    with _progress(workload, total, progress) as bar:
        for mode in modes:
            bar.set_postfix_str(f"starting the {mode.label} server")
            with open(log_dir / f"{mode.label}.log", "w") as log, \
                    mode_server(mode, settings, overrides, log, seeded=workload.votes) as (backend, command):
                configs[mode.label] = {**server_config(backend, command), "server_log": str(log_dir / f"{mode.label}.log")}
                for item in warm:
                    bar.set_postfix_str(f"warm-up {mode.label}")
                    rec = run_once(backend, workload, item, params, cgee[mode.label], audits[mode.label],
                                   stop=mode.stop)
                    warm_runs[mode.label].append(rec["wall_s"])
                    bar.update()
                for item, r in schedule(items, settings.repeats, workload.flush_between_problems):
                    if not workload.flush_between_problems and item is items[0] and not backend.flush_cache():
                        raise RuntimeError(f"could not flush the {mode.label} server's cache")
                    bar.set_postfix_str(f"problem {item.index + 1}/{len(items)} {mode.label}")
                    rec = run_once(backend, workload, item, params, cgee[mode.label], audits[mode.label],
                                   stop=mode.stop)
                    rec.update(problem=item.index, repeat=r)
                    runs[mode.label].append(rec)
                    bar.update()
                configs[mode.label].update(_attention_hook_cost(backend, runs[mode.label], warm_runs[mode.label]))
    return runs, warm_runs, configs, overrides, items


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
    from .cgee import CGEEConfig

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
                  "launcher; float32 on the CPU, the scheduler bound to --threads cores), one mode after another, "
                  "on the same problems; each server serves the warm-up problems (seed + 100000, dropped) and then "
                  "every problem and repeat before it is ended. The programs run through sgl.RuntimeEndpoint from "
                  "this process. The cache is flushed before every program unless the workload keeps it "
                  "(pressure). Time per problem = median over repeats of the program's wall time, less the CGEE "
                  "audit pass. Speedups as for the engine: ratios of medians with a 95% paired bootstrap over "
                  "problems. Token counters come from the server's meta_info of each request (prompt, cached, "
                  "completion tokens); the runtime reports no per-run KV peak. Agreement as for the engine.")


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
    return rows


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


def target_rows(result: Dict[str, Any]) -> List[tuple]:
    rows = [("target", "measured", "needed", "")]
    for t in result["targets"]:
        rows.append((t["name"], _fmt(t["value"], ".4g", "not run"), t["target"],
                     "n/a" if t["ok"] is None else ("ok" if t["ok"] else "MISS")))
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
    if result["targets"]:
        out += "\n\n" + format_table(target_rows(result))
    return out


def markdown_report(result: Dict[str, Any]) -> str:
    lines = [f"**{title_of(result)}**", "", f"Command: `{result['command']}`", "",
             markdown_table(table_rows(result))]
    if result["targets"]:
        lines += ["", markdown_table(target_rows(result))]
    lines += ["", "Speedups: ratios of per-problem median times measured in this run, 95% paired bootstrap "
                  "interval over problems. Verifier run/skip/early: verify calls whose pass ran / was skipped "
                  "(gate 1) / stopped some branch before the last layer (gate 2). CGEE errors: gated decisions "
                  "that differ from the full pass / verify calls compared. Token counts are medians per "
                  "program; hits are prompt tokens served from the cache (exact) or from a similar span "
                  "(ASKS); verifier tok: tokens the verify step computed (not in prefill tok)."]
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
             "--warmup", str(settings.warmup), "--model", settings.model, "--threads", str(settings.threads),
             "--device", settings.device, "--dtype", settings.dtype, "--kv-pool-tokens", str(settings.kv_pool_tokens),
             "--asks-tau", f"{settings.asks_tau:g}",
             "--asks-recompute", f"{settings.asks_recompute:g}", "--asks-key-layer", str(settings.asks_key_layer),
             "--audit-fraction", f"{settings.audit_fraction:g}", "--backend", settings.backend]
    if settings.server_args:
        parts += ["--server-args", settings.server_args]
    for key, value in settings.params.items():
        if value is not None:
            parts += [f"--{key.replace('_', '-')}", str(value)]
    if out_dir is not None:
        parts += ["--out-dir", str(out_dir)]
    return shlex.join(parts)


# ---- command line ------------------------------------------------------------------------------
PARAM_FLAGS = {"branches": int, "max_tokens": int, "prompt_tokens": int, "temperature": float, "keep": int,
               "expand": int, "programs": int, "pool_fraction": float, "prefixes": int, "restate": int,
               "difficulty": str, "until_answer": int, "clients": int, "disconnect_share": float, "malformed_share": float}


def add_bench_args(parser) -> None:
    """The flags of ``rksc-sgl bench`` (see :func:`bench_command`)."""
    d = BenchSettings()
    parser.add_argument("--workload", default="paper",
                        help="comma-separated workloads: "
                             + "; ".join(f"{w.name}: {w.help}" for w in WORKLOADS.values())
                             + " (default: paper)")
    parser.add_argument("--modes", default="none,radix,rksc",
                        help="comma-separated modes: " + "; ".join(f"{m.name} ({m.help})" for m in MODES.values())
                             + ". An ASKS mode takes its own tau as NAME@TAU and key layer as :L<layer>, e.g. "
                               "asks@0.8 or asks@0.9:L4 (default: none,radix,rksc)")
    parser.add_argument("--problems", type=int, default=d.problems, help=f"timed problems (default: {d.problems})")
    parser.add_argument("--seed", type=int, default=d.seed, help="reasoning-gym seed of the problems (default: 0)")
    parser.add_argument("--repeats", type=int, default=d.repeats,
                        help=f"timed runs of every problem per mode (default: {d.repeats})")
    parser.add_argument("--warmup", type=int, default=d.warmup,
                        help=f"warm-up problems per mode, not counted (default: {d.warmup})")
    parser.add_argument("--model", default=d.model, help=f"model alias or local folder (default: {d.model})")
    parser.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads (default: 1)")
    parser.add_argument("--backend", choices=BACKENDS, default=d.backend,
                        help="engine: every mode on an embedded engine in this process; runtime: every mode as a "
                             "real SGLang server (launch_server), one after another (default: engine)")
    parser.add_argument("--server-args", default=d.server_args, metavar="FLAGS",
                        help="with --backend runtime: further SGLang flags for every mode's server, as one "
                             "string (e.g. '--schedule-policy lpm')")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default=d.device,
                        help=f"where the engines run (default: {d.device})")
    parser.add_argument("--dtype", choices=("auto",) + DTYPES, default=d.dtype,
                        help="the engines' dtype (default: auto, float32 on the CPU, bfloat16 on CUDA)")
    parser.add_argument("--kv-pool-tokens", type=int, default=d.kv_pool_tokens,
                        help=f"KV slots per engine (default: {d.kv_pool_tokens}; pressure sets its own)")
    parser.add_argument("--asks-tau", type=float, default=d.asks_tau,
                        help=f"ASKS threshold of the ASKS modes without @TAU (default: {d.asks_tau})")
    parser.add_argument("--asks-recompute", type=float, default=d.asks_recompute,
                        help=f"ASKS recompute fraction (default: {d.asks_recompute})")
    parser.add_argument("--asks-key-layer", type=int, default=d.asks_key_layer,
                        help="ASKS key layer of the ASKS modes without :L<layer> (0: token embeddings, free; "
                             f"L: hidden states after L blocks, the recipient's span runs through them) "
                             f"(default: {d.asks_key_layer})")
    parser.add_argument("--audit-fraction", type=float, default=d.audit_fraction,
                        help="share of gated verify calls that also run the full pass to count errors; its time "
                             f"is left out (default: {d.audit_fraction})")
    parser.add_argument("--bootstrap", type=int, default=d.bootstrap,
                        help=f"bootstrap resamples of the speedup intervals (default: {d.bootstrap})")
    group = parser.add_argument_group("workload parameters (default: the workload's own)")
    for key, kind in PARAM_FLAGS.items():
        takes = ", ".join(f"{w.name} {w.defaults[key]}" for w in WORKLOADS.values() if key in w.defaults)
        group.add_argument(f"--{key.replace('_', '-')}", dest=key, type=kind, default=None,
                           help=f"defaults: {takes}")
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR,
                        help=f"where bench_<workload>.json/.md/.png go (default: {DEFAULT_OUT_DIR})")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def settings_from_args(args) -> BenchSettings:
    return BenchSettings(problems=args.problems, seed=args.seed, repeats=args.repeats, warmup=args.warmup,
                         model=args.model, threads=args.threads, device=args.device, dtype=args.dtype,
                         kv_pool_tokens=args.kv_pool_tokens,
                         asks_tau=args.asks_tau, asks_recompute=args.asks_recompute,
                         asks_key_layer=args.asks_key_layer,
                         audit_fraction=args.audit_fraction, bootstrap=args.bootstrap, backend=args.backend,
                         server_args=args.server_args,
                         params={k: getattr(args, k) for k in PARAM_FLAGS if getattr(args, k) is not None})


def validate_args(args) -> Tuple[List[Workload], List[Mode], BenchSettings]:
    """Every input checked before anything is loaded; ``ValueError`` says what is wrong."""
    workloads = parse_workloads(args.workload)
    modes = parse_modes(args.modes)
    settings = settings_from_args(args)
    for w in workloads:
        w.resolve(settings.params)
        stopping = [m.label for m in modes if m.name.startswith("stop-")]
        if stopping and not w.votes:
            raise ValueError(f"workload {w.name!r} does not vote over forks, so mode(s) {', '.join(stopping)} "
                             f"would stop nothing; they run with {', '.join(x.name for x in WORKLOADS.values() if x.votes)}")
    if settings.backend == "runtime":
        from .runtime.bench_servers import server_flags

        for mode in modes:
            server_flags(mode, settings, {}, 0)
    return workloads, modes, settings


def bench_command(args, error: Callable[[str], None]) -> int:
    """``rksc-sgl bench``: run each workload, write its report, print its table."""
    try:
        workloads, modes, settings = validate_args(args)
    except ValueError as exc:
        error(str(exc))
        return 2
    for workload in workloads:
        params = {k: v for k, v in settings.params.items() if k in workload.defaults}
        ws = dataclasses.replace(settings, params=params)
        result = run_bench(workload, modes, ws, progress=not args.no_progress,
                           command=command_line(workload.name, modes, ws))
        save(result, Path(args.out_dir))
    return 0
