"""``rksc-sgl bench``: cache modes compared on reasoning workloads, on embedded engines in one
process (``--backend engine``) or on real SGLang servers (``--backend runtime``).

    rksc-sgl bench --workload paper --modes none,radix,rksc --problems 8 --seed 0
    rksc-sgl bench --list      # every workload's parameters, every mode's flags on both backends

Pieces, each small and registered by name:

- **Modes** (:data:`MODES`; :func:`mode_table` gives each one's exact engine arguments and
  SGLang flags): what ``Engine(...)`` gets and whether the verify step runs CGEE's gates.
  ``none`` (no reuse), ``radix`` (stock SGLang as a user gets it, LRU), ``rksc`` (every RKSC
  feature: the ``rksc-tree`` cache with ASKS and RSBCM, CGEE, lossless branch stop) and each
  RKSC component alone: ``asks``, ``cgee``, ``rsbcm``. An ASKS mode may carry its own
  threshold, ``asks@0.9``, so one run can sweep tau.
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
  attention hook), all started before any is timed (idle ones sleep) and ended at the end. Warm-up problems run first on
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

Modules (imports point down the table; ``workload`` knows no concrete workload):

================  ==========================================================================
module            holds
================  ==========================================================================
``inputs``        approach hints, few-shot problems, prompts, the benchmark's SGLang programs
``modes``         :class:`Mode` and :data:`MODES`, :func:`parse_modes`, :class:`BenchSettings`
``workload``      the :class:`Workload` interface, :data:`WORKLOADS` and its ``register``,
                  :class:`Item`/:class:`Outcome`/:class:`Target`
``gym_workloads`` ``paper``, ``cot``, ``tot``, ``paraphrase``, ``vote``
``serve``         ``serve``: closed-loop clients, faults, programs per second
``pressure``      ``pressure``: concurrent programs on a pool below their working set
``longbranch``    ``long-branches``: concurrent long branches on a pressured pool (compression)
``stats``         medians, ratios with bootstrap intervals, agreement, per-mode summaries
``runner``        :func:`run_bench`: engines or servers per mode, the schedule, the summary
``tables``        the text/markdown tables, the plot, :func:`save`, :func:`command_line`
``cli``           ``rksc-sgl bench``'s arguments and command
``report``        what every benchmark shares (machine facts, run records, tables, saving)
``fidelity``      continuation fidelity of decode-KV compression (``bench_compression.py``)
================  ==========================================================================
"""

from __future__ import annotations


from rksc_sgl.bench import gym_workloads, load, longbranch, noreuse, pressure, serve  # noqa: F401  (each registers its workloads)
from rksc_sgl.bench.cli import add_bench_args, bench_command, bench_description, validate_args
from rksc_sgl.bench.inputs import PARAPHRASES, build_prompt, extract_final, few_shot_problem, hints_for, program
from rksc_sgl.bench.modes import MODES, BenchSettings, Mode, mode_table, parse_modes
from rksc_sgl.bench.runner import run_bench, schedule
from rksc_sgl.bench.tables import command_line, markdown_report, save
from rksc_sgl.bench.workload import WORKLOADS, Item, Outcome, Target, Workload, get_workload, parse_workloads, register

__all__ = ["MODES", "PARAPHRASES", "WORKLOADS", "BenchSettings", "Item", "Mode", "Outcome", "Target", "Workload",
           "add_bench_args", "bench_command", "bench_description", "build_prompt", "command_line", "extract_final", "few_shot_problem",
           "get_workload", "hints_for", "markdown_report", "mode_table", "parse_modes", "parse_workloads", "program", "register",
           "run_bench", "save", "schedule", "validate_args"]
