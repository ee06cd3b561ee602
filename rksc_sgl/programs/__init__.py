"""Reasoning programs (``@sgl.function``), importable so that the bench and an installed
wheel have them; ``programs/`` of the repository holds their command lines.

======================  ======================================================================
module                  program
======================  ======================================================================
``self_consistency``    N sampled chains, majority vote (``rksc-sgl demo``)
``best_of_n``           N solutions, a YES/NO ``select`` judges each
``best_of_n_cgee``      N solutions, ``rksc_sgl.verify`` (CGEE) picks the answer
``tree_of_thought``     propose, judge, expand the promising approaches, vote
======================  ======================================================================
"""
