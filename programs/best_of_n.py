"""Best-of-N with a verifier: N sampled solutions, a YES/NO ``select`` judges each one.

    python programs/best_of_n.py --cache radix --problems 3 --branches 4
    rksc-sgl run programs/best_of_n.py --cache radix -- --problems 3

The program is ``rksc_sgl/programs/best_of_n.py`` (in the package, so that the bench and an
installed wheel have it); this script is its command line.
"""

import sys

from rksc_sgl.programs import best_of_n as program
from rksc_sgl.programs.best_of_n import VERDICTS, VERIFY_PROMPT, best_of_n, pick, solve  # noqa: F401  (re-exported for importers)

if __name__ == "__main__":
    from rksc_sgl.program_runner import program_main

    sys.exit(program_main(solve, description=program.__doc__, title="best-of-N",
                          problems=3, branches=4, max_tokens=96, temperature=0.7))
