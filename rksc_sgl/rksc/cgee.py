"""CGEE: confidence-gated verification of forked branches, in one call of a program.

Inside an ``@sgl.function``, after the branches of a ``fork`` have generated::

    forks = s.fork(8)
    forks += sgl.assistant(sgl.gen("solution", max_tokens=96, return_logprob=True))
    best = rksc_sgl.verify(forks, answer="solution")
    best.answer, best.branch, best.scores, best.gates   # chosen answer / branch, per-branch
                                                        # verifier P(yes), what the gates did

Each branch's answer is extracted from its ``answer`` variable
(:func:`rksc_sgl.problems.extract_answer` unless ``extract=`` is given). Two gates:

1. **Skip** (any backend): when the extracted answers agree decisively -- the top
   answer's vote share >= ``skip_min_vote_share`` and the mean generation confidence of
   the branches that gave it >= ``skip_min_confidence`` -- no verifier pass runs; the
   top answer wins, from its most confident branch. Generation confidence is the mean
   probability of the tokens a branch generated up to its end (tokens from the first EOS
   on excluded), from the gen's token log-probabilities (``return_logprob=True``), else
   the engine's ``output_token_probs_mean``.
2. **Layer exit** (embedded engine only): the verifier pass -- each branch's
   conversation continued with ``verify_prompt`` as a user turn, the next token scored
   "Yes" vs "No", all branches in one batch -- stops per branch once its logit-lens
   verdict has been stable and low-entropy for ``exit_window`` layers
   (:mod:`rksc_sgl.rksc.verifier`). On other backends (``sgl.RuntimeEndpoint``) the full
   verifier runs as ``sgl.select`` over ("Yes", "No") on a copy of each branch.

With a verifier pass, the answer is chosen by ``selection``: ``"weighted_vote"``
(default: each answer scores the sum of its branches' P(yes); ties -> more votes ->
first seen) or ``"max_yes"`` (the answered branch with the highest P(yes)).

With both gates off the result is exactly the plain full verifier pass. **Audit**: for
a fraction ``audit_fraction`` of the calls where a gate changed something, the full
pass runs as well and the decisions (chosen answers) are compared; :class:`AuditLog`
keeps the live error rate (disagreements / verify calls, warm-up calls excluded) with a
95% Wilson interval.

Default thresholds come from ``benchmarks/calibrate_cgee.py`` (problem seeds disjoint
from the benchmark's); its record is ``benchmarks/results/engine/cgee/calibration-seed1000/``.
"""

from __future__ import annotations

import dataclasses
import math
import random
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, runtime_checkable

from rksc_sgl.problems import extract_answer
from rksc_sgl.rksc.cgee_decisions import choose, generation_confidence, skip_decision
from rksc_sgl.rksc.verifier import ExitPolicy, wilson_interval


@runtime_checkable
class LayerExitBackend(Protocol):
    """A backend that runs CGEE's verifier pass itself, layer by layer with gate 2's exit (the
    embedded engine, ``rksc_sgl.rksc.verifier``). Any other backend (SGLang's
    ``RuntimeEndpoint``) verifies with a YES/NO ``select``, every layer run."""

    def verify_yes_no(self, prompts: Sequence[str], policy: Optional[ExitPolicy] = None,
                      trace: bool = False) -> list: ...


SELECTIONS = ("weighted_vote", "max_yes")
DEFAULT_VERIFY_PROMPT = "Is this solution correct? Answer Yes or No."


@dataclasses.dataclass(frozen=True)
class CGEEConfig:
    """Gate switches and thresholds (validated; frozen, so one config can be shared)."""

    # Thresholds: benchmarks/results/engine/cgee/calibration-seed1000/ (80 problems, seed 1000, 0 errors).
    # The exit gate is off by default: on the ``paper`` workload (bench_paper.json) its
    # calibrated layer-26 exit changed the chosen answer on 2 of 8 problems -- the logit
    # lens keeps a branch's Yes/No verdict but not the P(yes) that ``weighted_vote`` adds
    # up -- for at most 4 of 30 layers saved. Switch it on with ``exit_gate=True``.
    skip_gate: bool = True
    skip_min_vote_share: float = 0.5
    skip_min_confidence: float = 0.0
    exit_gate: bool = False
    exit_entropy_bits: float = 0.05
    exit_window: int = 6
    exit_min_layer: int = 26
    selection: str = "weighted_vote"
    verify_prompt: str = DEFAULT_VERIFY_PROMPT
    audit_fraction: float = 0.0
    audit_seed: int = 0
    eos_token_ids: tuple = ()
    """EOS ids for cutting a branch's confidence; the engine's own are added automatically."""

    def __post_init__(self):
        if not 0.0 < self.skip_min_vote_share <= 1.0:
            raise ValueError(f"skip_min_vote_share must be in (0, 1], got {self.skip_min_vote_share}")
        if not 0.0 <= self.skip_min_confidence <= 1.0:
            raise ValueError(f"skip_min_confidence must be in [0, 1], got {self.skip_min_confidence}")
        if not 0.0 <= self.audit_fraction <= 1.0:
            raise ValueError(f"audit_fraction must be in [0, 1], got {self.audit_fraction}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r}; choose one of {', '.join(SELECTIONS)}")
        if not self.verify_prompt.strip():
            raise ValueError("verify_prompt is empty")
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))
        self.exit_policy()  # validates the exit thresholds

    def exit_policy(self) -> ExitPolicy:
        return ExitPolicy(enabled=self.exit_gate, entropy_bits=self.exit_entropy_bits,
                          window=self.exit_window, min_layer=self.exit_min_layer)

    def full(self) -> "CGEEConfig":
        """The same config with both gates off: the plain full verifier pass."""
        return dataclasses.replace(self, skip_gate=False, exit_gate=False, audit_fraction=0.0)


@dataclasses.dataclass
class VerifyResult:
    """What :func:`verify` decided, per branch and per gate."""

    branch: Optional[int]
    answer: Optional[str]
    answers: List[Optional[str]]
    confidences: List[Optional[float]]
    scores: List[Optional[float]]
    """Per-branch verifier P(yes); ``None`` everywhere when the pass was skipped."""
    gates: Dict[str, Any]
    state: Any = dataclasses.field(default=None, repr=False)
    """The chosen branch's ``ProgramState``."""

    @property
    def skipped(self) -> bool:
        return bool(self.gates.get("skipped"))


# ---- audit -------------------------------------------------------------------------------
class AuditLog:
    """Live comparison of gated decisions with the full pass.

    Every verify call counts (after ``warmup`` calls); a call whose gates changed nothing
    ran the full pass itself and agrees by construction. ``error_rate`` = disagreeing
    audited calls / counted calls that were audited or ungated.
    """

    def __init__(self, warmup: int = 0):
        self.warmup = warmup
        self.lock = threading.Lock()
        self.calls = 0
        self.counted = 0
        self.skipped = 0
        self.exited_passes = 0
        self.audited = 0
        self.compared = 0  # counted calls whose decision is known to match or not
        self.disagreements = 0
        self.branch_disagreements = 0

    def record(self, gated: bool, audited: bool, agrees: Optional[bool], branch_agrees: Optional[bool],
               skipped: bool, exited: bool) -> None:
        with self.lock:
            self.calls += 1
            if self.calls <= self.warmup:
                return
            self.counted += 1
            self.skipped += int(skipped)
            self.exited_passes += int(exited)
            self.audited += int(audited)
            if not gated or audited:
                self.compared += 1
                self.disagreements += int(agrees is False)
                self.branch_disagreements += int(branch_agrees is False)

    def error_rate(self) -> Dict[str, Any]:
        with self.lock:
            lo, hi = wilson_interval(self.disagreements, self.compared)
            rate = self.disagreements / self.compared if self.compared else None
            return {"calls": self.calls, "counted": self.counted, "compared": self.compared,
                    "audited": self.audited, "skipped": self.skipped, "disagreements": self.disagreements,
                    "branch_disagreements": self.branch_disagreements,
                    "error_rate": rate, "ci95": [lo, hi]}


DEFAULT_AUDIT = AuditLog()


# ---- the call a program makes ----------------------------------------------------------------
def verify(forks, answer: str = "answer", question: Optional[str] = None, *,
           config: Optional[CGEEConfig] = None, extract: Callable[[str], Optional[str]] = extract_answer,
           audit_log: Optional[AuditLog] = None, branch_vote=None, **overrides: Any) -> VerifyResult:
    """Verify the branches of a fork and pick the answer (see the module docstring).

    ``forks``: the ``s.fork(n)`` group (or a list of its states), after each branch
    generated the variable ``answer``. ``question`` is only used when ``verify_prompt``
    contains ``{question}``. Keyword ``overrides`` replace fields of ``config``.

    ``branch_vote``: the :class:`rksc_sgl.rksc.branch_stop.BranchVote` of ``rksc_sgl.vote`` on
    the same forks. Its stopped branches hold partial text: they are neither voted nor
    verified (their answer, confidence and score are ``None``); ``gates["stopped"]`` lists
    them and ``gates["vote"]`` carries the vote (rule, answer, branches finished when it
    settled). Branch indices stay the forks' own.
    """
    config = config or CGEEConfig()
    if overrides:
        config = dataclasses.replace(config, **overrides)
    audit_log = audit_log if audit_log is not None else DEFAULT_AUDIT
    states = list(getattr(forks, "states", forks))
    if not states:
        raise ValueError("verify needs at least one branch")
    if branch_vote is None:
        return _verify(states, answer, question, config, extract, audit_log)
    if len(branch_vote.answers) != len(states):
        raise ValueError(f"branch_vote is of {len(branch_vote.answers)} branches, the forks are {len(states)}")
    kept = [i for i in range(len(states)) if i not in branch_vote.stopped]
    result = _verify([states[i] for i in kept], answer, question, config, extract, audit_log)
    return _with_stopped(result, kept, len(states), branch_vote)


def _with_stopped(result: VerifyResult, kept: List[int], n: int, branch_vote) -> VerifyResult:
    """``result`` over the kept branches, re-indexed to all ``n`` (stopped ones ``None``)."""
    def spread(values):
        out: List[Any] = [None] * n
        for i, v in zip(kept, values):
            out[i] = v
        return out

    gates = {**result.gates, "stopped": sorted(branch_vote.stopped),
             "vote": {"rule": branch_vote.rule, "answer": branch_vote.answer,
                      "settled_after": branch_vote.settled_after}}
    branch = kept[result.branch] if result.branch is not None else None
    return dataclasses.replace(result, branch=branch, answers=spread(result.answers),
                               confidences=spread(result.confidences), scores=spread(result.scores), gates=gates)


def _verify(states, answer: str, question: Optional[str], config: CGEEConfig,
            extract: Callable[[str], Optional[str]], audit_log: AuditLog) -> VerifyResult:
    backend = states[0].stream_executor.backend
    eos = set(config.eos_token_ids) | set(getattr(backend, "eos_ids", ()) or ())
    texts = [s[answer] for s in states]  # waits for each branch
    answers = [extract(t) for t in texts]
    confidences = [generation_confidence(s.get_meta_info(answer), eos) for s in states]
    started = time.perf_counter()
    gate1 = skip_decision(answers, confidences, config)
    gates: Dict[str, Any] = {"skip_gate": config.skip_gate, "exit_gate": config.exit_gate,
                             "vote_share": gate1["vote_share"], "top_confidence": gate1["confidence"],
                             "skipped": gate1["skip"], "num_layers": None, "layers_run": None,
                             "mean_exit_layer": None, "exit_available": isinstance(backend, LayerExitBackend),
                             "verifier_new_tokens": 0, "verifier_cached_tokens": 0,
                             "audited": False, "audit_agrees": None}
    scores: List[Optional[float]] = [None] * len(states)
    if gate1["skip"]:
        branch, chosen = gate1["branch"], gate1["answer"]
        exited = False
    else:
        scores, run = _verifier_pass(states, backend, config, question, config.exit_gate)
        gates.update(run)
        branch, chosen = choose(answers, scores, config.selection)
        exited = any(r < run["num_layers"] for r in run["layers_run"] or [])
    gates["verifier_s"] = time.perf_counter() - started
    gated = gate1["skip"] or exited
    agrees = branch_agrees = None
    if gated and config.audit_fraction > 0 and _draw(config, audit_log):
        t0 = time.perf_counter()
        full_scores, full_run = _verifier_pass(states, backend, config, question, False)
        full_branch, full_answer = choose(answers, full_scores, config.selection)
        agrees, branch_agrees = full_answer == chosen, full_branch == branch
        gates.update(audited=True, audit_agrees=agrees, audit_branch_agrees=branch_agrees,
                     audit_answer=full_answer, audit_branch=full_branch, audit_scores=full_scores,
                     audit_s=time.perf_counter() - t0, audit_layers_run=full_run["layers_run"])
    audit_log.record(gated, gates["audited"], agrees if gated else True, branch_agrees if gated else True,
                     gate1["skip"], exited)
    return VerifyResult(branch=branch, answer=chosen, answers=answers, confidences=confidences,
                        scores=scores, gates=gates, state=states[branch] if branch is not None else None)


_DRAW_LOCK = threading.Lock()
_RNGS: Dict[tuple, random.Random] = {}


def _draw(config: CGEEConfig, log: AuditLog) -> bool:
    with _DRAW_LOCK:
        rng = _RNGS.setdefault((id(log), config.audit_seed), random.Random(config.audit_seed))
        return rng.random() < config.audit_fraction


def verifier_prompt(state, config: CGEEConfig, question: Optional[str]) -> str:
    """The branch's conversation, then the verify turn, then the assistant prefix."""
    exe = state.stream_executor
    template = exe.chat_template
    text = state.text()
    ask = config.verify_prompt.format(question=question) if "{question}" in config.verify_prompt \
        else config.verify_prompt
    messages = list(exe.messages_)
    u_pre, u_suf = template.get_prefix_and_suffix("user", messages)
    a_pre, _ = template.get_prefix_and_suffix("assistant", messages + [{"role": "user", "content": ask}])
    return text + u_pre + ask + u_suf + a_pre


def _verifier_pass(states, backend, config: CGEEConfig, question, exit_gate: bool) -> tuple:
    prompts = [verifier_prompt(s, config, question) for s in states]
    if isinstance(backend, LayerExitBackend):
        policy = config.exit_policy() if exit_gate else ExitPolicy(enabled=False)
        results = backend.verify_yes_no(prompts, policy=policy)
        layers = [r.layers_run for r in results]
        return [r.p_yes for r in results], {
            "num_layers": results[0].num_layers, "layers_run": layers,
            "mean_exit_layer": sum(layers) / len(layers),
            "exited_early": sum(r.exited_early for r in results),
            "verifier_new_tokens": sum(r.new_tokens for r in results),
            "verifier_cached_tokens": sum(r.cached_tokens for r in results)}
    return _select_pass(states, config, question), {"num_layers": None, "layers_run": None,
                                                    "mean_exit_layer": None, "exited_early": 0,
                                                    "verifier_new_tokens": None, "verifier_cached_tokens": None}


def _select_pass(states, config: CGEEConfig, question) -> List[float]:
    """Full verifier on any backend: ``sgl.select`` over ("Yes", "No") on a copy of each branch."""
    import sglang as sgl

    ask = config.verify_prompt.format(question=question) if "{question}" in config.verify_prompt \
        else config.verify_prompt
    copies = [s.fork(1)[0] for s in states]
    for c in copies:  # submitted before any is read: they batch
        c += sgl.user(ask)
        c += sgl.assistant(sgl.select("cgee_verdict", choices=["Yes", "No"]))
    out = []
    for c in copies:
        # Not the normalized scores: SGLang averages them over the choice and the prompt's
        # last tokens, which tempers Yes-vs-No. Summed, the shared prompt tokens cancel and
        # what is left is log P(Yes) - log P(No), as the embedded verifier computes it.
        yes, no = (sum(float(t[0]) for t in lps if t[0] is not None)
                   for lps in c.get_meta_info("cgee_verdict")["input_token_logprobs"])
        out.append(1.0 / (1.0 + math.exp(no - yes)))
    return out
