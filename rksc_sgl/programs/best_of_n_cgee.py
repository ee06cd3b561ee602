"""Best-of-N with a confidence-gated verifier (CGEE): ``rksc_sgl.verify`` picks the answer.

    python programs/best_of_n_cgee.py --problems 3 --branches 8
    rksc-sgl run programs/best_of_n_cgee.py --cache radix -- --problems 3 --exit-gate on

N sampled solutions; then one call verifies them: when the branches already agree
decisively no verifier pass runs (gate 1), otherwise a batched Yes/No verifier pass,
which on the embedded engine stops at an intermediate layer once the logit-lens verdict
is stable (gate 2). See ``rksc_sgl/rksc/cgee.py``.

Its command line is ``programs/best_of_n_cgee.py``; the program lives in the package so
that the bench and an installed wheel have it.
"""

from typing import Any, Optional

import sglang as sgl

import rksc_sgl
from rksc_sgl.rksc.cgee import CGEEConfig, VerifyResult
from rksc_sgl.problems import CHAIN_STOP, SYSTEM_PROMPT, Problem, Solution, question_prompt


@sgl.function
def best_of_n_cgee(s, question: str, num_branches: int = 8, max_tokens: int = 96,
                   sample_temperature: float = 0.7, cgee: Optional[CGEEConfig] = None,
                   audit_log: Any = None) -> VerifyResult:
    s += sgl.system(SYSTEM_PROMPT)
    s += sgl.user(question_prompt(question))
    forks = s.fork(num_branches)
    forks += sgl.assistant(sgl.gen("solution", max_tokens=max_tokens, temperature=sample_temperature,
                                   stop=list(CHAIN_STOP), return_logprob=True))
    return rksc_sgl.verify(forks, answer="solution", question=question, config=cgee, audit_log=audit_log)


def solve(problem: Problem, num_branches: int = 8, max_tokens: int = 96, sample_temperature: float = 0.7,
          backend: Any = None, cgee: Optional[CGEEConfig] = None, audit_log: Any = None,
          **gates: Any) -> Solution:
    """``gates``: CGEEConfig fields from the command line (``--exit-gate on``, ...), used
    when no ``cgee`` config is given."""
    if cgee is None and gates:
        cgee = CGEEConfig(**gates)
    state = best_of_n_cgee.run(question=problem.question, num_branches=num_branches, max_tokens=max_tokens,
                               sample_temperature=sample_temperature, cgee=cgee, audit_log=audit_log,
                               backend=backend)
    best: VerifyResult = state.ret_value
    if isinstance(best, Exception) or best is None:
        raise RuntimeError(f"best_of_n_cgee failed: {state.error() if hasattr(state, 'error') else best}")
    g = best.gates
    if g["skipped"]:
        detail = f"skipped verifier (vote share {g['vote_share']:.2f}); branch {best.branch}"
    else:
        detail = f"verified, mean exit layer {g['mean_exit_layer']}/{g['num_layers']}; branch {best.branch}"
    return Solution(answer=best.answer, candidates=best.answers, detail=detail)


def cli_options() -> dict:
    """This program's own flags: the CGEE gates (``program_main``'s ``options``)."""
    from rksc_sgl.arg_types import fraction, on_off

    defaults = CGEEConfig()
    return {
        "skip_gate": (on_off, defaults.skip_gate, "CGEE gate 1, skip the verifier when the branches agree"),
        "skip_min_vote_share": (fraction, defaults.skip_min_vote_share, "gate 1's vote share"),
        "exit_gate": (on_off, defaults.exit_gate, "CGEE gate 2, layer exit"),
        "audit_fraction": (fraction, defaults.audit_fraction, "share of gated calls also run in full to count errors"),
    }
