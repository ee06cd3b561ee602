"""What every benchmark's report shares: machine facts, versions, tables, and saving.

Used by ``rksc-sgl bench`` (:mod:`rksc_sgl.bench`) and the scripts in ``benchmarks/``:

- :func:`cpu_model`, :func:`versions` -- what a result must name so it can be compared;
- :func:`run_record` -- the fields every result file opens with: benchmark, command, commit,
  date, versions and machine (``benchmarks/manifest.py`` indexes results by them);
- :func:`median` -- the statistic every timing is summarised by;
- :func:`format_table` (aligned text) and :func:`markdown_table` (GitHub markdown), from the
  same rows of cells;
- :func:`save_and_report` -- write ``NAME.json`` (with the table), ``NAME.png`` (and
  ``NAME.md`` when given markdown), then print the title and the table.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence


def median(xs: Sequence[float]) -> float:
    """The median, ``nan`` for no values."""
    return statistics.median(xs) if len(xs) else float("nan")


def bootstrap_mean_ci(values: Sequence[float], samples: int = 2000, seed: int = 0) -> List[float]:
    """95% percentile bootstrap interval of the mean of ``values`` (each resample draws
    ``len(values)`` of them with replacement, ``random.Random(seed).choices``). For paired
    data, pass the per-item differences."""
    rng = random.Random(seed)
    boot = sorted(statistics.fmean(rng.choices(values, k=len(values))) for _ in range(samples))
    return [boot[int(0.025 * len(boot))], boot[int(0.975 * len(boot)) - 1]]


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions() -> Dict[str, Optional[str]]:
    """Versions of Python and of the packages a result depends on (``None``: not installed)."""
    import importlib.metadata as md

    import torch
    import transformers

    out: Dict[str, Optional[str]] = {"python": sys.version.split()[0], "torch": torch.__version__,
                                     "transformers": transformers.__version__}
    for pkg in ("sglang", "rksc-sgl", "reasoning-gym", "matplotlib", "xgrammar"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def git_output(folder: Path, *args: str) -> Optional[str]:
    """``git -C folder ARGS``'s output, stripped; ``None`` when git fails or is missing."""
    try:
        out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def source_commit(folder: Optional[Path] = None) -> Optional[str]:
    """The git commit of the checkout ``folder`` (default: this package's) is in, with
    ``-dirty`` when tracked files differ from it; ``None`` outside a git checkout (a wheel)."""
    folder = Path(folder or Path(__file__).resolve().parent)
    head = git_output(folder, "rev-parse", "HEAD")
    if not head:
        return None
    dirty = git_output(folder, "status", "--porcelain", "--untracked-files=no")
    return head + ("-dirty" if dirty else "")


def invoked_command() -> str:
    """The command line this process was started with, as a user would retype it."""
    script = Path(sys.argv[0])
    head = [script.name] if script.name == "rksc-sgl" else ["python", sys.argv[0]]
    return shlex.join([*head, *sys.argv[1:]])


def run_record(benchmark: str, command: Optional[str] = None, commit: Optional[str] = None) -> Dict:
    """What every result file records first: which benchmark, the command that reproduces
    it (default: this process's), the source commit, the date, the versions and the machine.

    ``commit``: :func:`source_commit` taken when the run started, for a record written at its
    end (the checkout may have moved on meanwhile); default: the commit now."""
    import torch

    return {"benchmark": benchmark, "command": command or invoked_command(), "commit": commit or source_commit(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_num_threads": torch.get_num_threads()}


def format_table(rows: List[tuple]) -> str:
    """Rows of cells as aligned text: first column left, the rest right, a rule under the header."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            lines.append("-" * len(lines[0]))
    return "\n".join(lines)


def markdown_table(rows: List[tuple]) -> str:
    """The same rows as a GitHub markdown table (first row is the header)."""
    def cell(c) -> str:
        return str(c).replace("|", "\\|")

    head, *body = rows
    lines = ["| " + " | ".join(cell(c) for c in head) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def save_and_report(result: Dict, table: str, out_dir: Path, name: str, plot_fn: Callable[[Dict, Path], None],
                    title: str, markdown: Optional[str] = None) -> Dict[str, Path]:
    """Write ``name``.json (with the table), ``name``.png (and ``name``.md when ``markdown``
    is given), then print title and table. Returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result["table"] = table
    paths = {"json": out_dir / f"{name}.json", "png": out_dir / f"{name}.png"}
    if markdown is not None:
        result["markdown"] = markdown
        paths["md"] = out_dir / f"{name}.md"
        paths["md"].write_text(markdown)
    paths["json"].write_text(json.dumps(result, indent=2, default=str))
    plot_fn(result, paths["png"])
    print(f"\n{title}")
    print(table)
    print("\n" + "\n".join(f"wrote {p}" for p in paths.values()) + f"\n(total {result['total_wall_s']:.0f} s)")
    return paths


def pyplot():
    """matplotlib's ``pyplot`` on the file-only Agg backend (benchmarks never open windows)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, title: str, fontsize: int = 8, dpi: int = 110) -> None:
    """Title, lay out, write ``path`` and release the figure (every benchmark plot ends so)."""
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)


def benchmark_parser(doc: str):
    """The argument parser every benchmark script starts from: its docstring's first
    paragraph as the description, defaults shown in ``--help``, and ``--model-path`` (``--model``:
    its old spelling, with a notice; ``args.model`` either way)."""
    import argparse

    from rksc_sgl.arg_types import add_model_path

    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_model_path(parser, "smollm2-135m", "model alias or local folder")
    return parser
