"""Best-of-N with a confidence-gated verifier (CGEE): ``rksc_sgl.verify`` picks the answer.

    python programs/best_of_n_cgee.py --problems 3 --branches 8
    rksc-sgl run programs/best_of_n_cgee.py --cache radix -- --problems 3 --exit-gate on

The program is ``rksc_sgl/programs/best_of_n_cgee.py`` (in the package, so that the bench and an
installed wheel have it); this script is its command line.
"""

import sys

from rksc_sgl.programs import best_of_n_cgee as program
from rksc_sgl.programs.best_of_n_cgee import best_of_n_cgee, cli_options, solve  # noqa: F401  (re-exported for importers)

if __name__ == "__main__":
    from rksc_sgl.program_runner import program_main

    sys.exit(program_main(solve, description=program.__doc__, title="best-of-N (CGEE)",
                          problems=3, branches=8, max_tokens=96, temperature=0.7, options=cli_options()))
