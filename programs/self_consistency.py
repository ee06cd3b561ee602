"""Self-consistency: sample N chains of thought from one prompt, majority-vote the answers.

    python programs/self_consistency.py --cache radix --problems 3 --branches 4
    rksc-sgl run programs/self_consistency.py --cache radix -- --problems 3

The question is asked once and the state forked N ways, so every branch shares the
prompt's KV under ``--cache radix``. The program itself lives in ``rksc_sgl/programs/self_consistency.py``
(it is also what ``rksc-sgl demo`` runs); this script is its command line.
"""

import sys

from rksc_sgl.programs.self_consistency import self_consistency, solve  # noqa: F401  (re-exported for importers)

if __name__ == "__main__":
    from rksc_sgl.program_runner import program_main

    sys.exit(program_main(solve, description=__doc__, title="self-consistency",
                          problems=3, branches=4, max_tokens=96, temperature=0.7))
