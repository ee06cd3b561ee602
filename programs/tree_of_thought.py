"""Tree of thought: propose approaches, judge each, expand the promising ones, vote.

    python programs/tree_of_thought.py --cache radix --problems 3 --branches 3 --keep 2 --expand 2
    rksc-sgl run programs/tree_of_thought.py --cache radix -- --problems 3

The program is ``rksc_sgl/programs/tree_of_thought.py`` (in the package, so that the bench and an
installed wheel have it); this script is its command line.
"""

import sys

from rksc_sgl.programs import tree_of_thought as program
from rksc_sgl.programs.tree_of_thought import EXPAND_PROMPT, JUDGE_PROMPT, OPTIONS, PROPOSE_PROMPT, solve, tree_of_thought  # noqa: F401  (re-exported for importers)

if __name__ == "__main__":
    from rksc_sgl.program_runner import program_main

    sys.exit(program_main(solve, description=program.__doc__, title="tree-of-thought", options=OPTIONS,
                          problems=3, branches=3, max_tokens=96, temperature=0.7))
