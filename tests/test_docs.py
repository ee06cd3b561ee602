"""The documentation: the MkDocs site builds with ``--strict`` (no broken link or anchor, no page
missing from the nav), every relative link of README.md resolves to a file of the repository,
and every ``rksc-sgl`` command in README.md and docs/*.md (in ```bash blocks, and the inline
``rksc-sgl bench ... --modes ...`` commands tables name) parses with the real parsers; the
commands are parsed, never run."""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
ENV_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


# --- the site -----------------------------------------------------------------------------------

def _nav_files(nav) -> Iterator[str]:
    if isinstance(nav, str):
        yield nav
    elif isinstance(nav, list):
        for item in nav:
            yield from _nav_files(item)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_files(value)


def test_every_docs_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert config["docs_dir"] == "docs"
    listed = list(_nav_files(config["nav"]))
    assert len(listed) == len(set(listed)), "a page is listed twice in mkdocs.yml's nav"
    assert sorted(listed) == sorted(p.name for p in DOCS.glob("*.md")), "mkdocs.yml's nav and docs/ differ"


def test_the_site_builds_with_no_broken_link(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(ROOT / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").exists()


# --- README links -------------------------------------------------------------------------------

def _slugs(markdown: str) -> set:
    """The anchors MkDocs (Python-Markdown's toc) gives the headings of a page."""
    from markdown.extensions.toc import slugify

    slugs, in_code = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = re.sub(r"[`*]", "", line.lstrip("#").strip())
            slugs.add(slugify(title, "-"))
    return slugs


def _relative_links(page: Path) -> List[str]:
    text, in_code, links = page.read_text(), False, []
    for line in text.splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            links += [t for t in LINK.findall(line) if not re.match(r"[a-z]+:", t)]
    return links


def test_every_relative_link_of_the_readme_resolves():
    links = _relative_links(ROOT / "README.md")
    assert links, "the README links to no page"
    for link in links:
        path, _, anchor = link.partition("#")
        target = (ROOT / path) if path else ROOT / "README.md"
        assert target.exists(), f"README.md links to {link}, which is not in the repository"
        if anchor and target.suffix == ".md":
            assert anchor in _slugs(target.read_text()), f"README.md links to {link}: no such heading"


def test_the_readme_cites_no_file_outside_the_repository():
    text = (ROOT / "README.md").read_text()
    assert "../" not in text, "README.md names a path outside the repository"


# --- commands -----------------------------------------------------------------------------------

def shell_commands(page: Path) -> Iterator[Tuple[int, List[str]]]:
    """``(line, words)`` of every command in the page's ```bash blocks: continuation lines
    joined, comments and leading environment assignments dropped."""
    lines = page.read_text().splitlines()
    in_bash, pending, start = False, "", 0
    for number, line in enumerate(lines, 1):
        if line.startswith("```"):
            in_bash = line.strip() in ("```bash", "```sh", "```shell") and not in_bash
            pending = ""
            continue
        if not in_bash:
            continue
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        words = shlex.split(pending + line, comments=True)
        pending = ""
        while words and ENV_ASSIGNMENT.match(words[0]):
            words = words[1:]
        if words:
            yield start, words


def _rksc_sgl_argv(words: List[str]):
    """The arguments after ``rksc-sgl`` (or ``python -m rksc_sgl``), or ``None``."""
    if os.path.basename(words[0]) == "rksc-sgl":
        return words[1:]
    if os.path.basename(words[0]).startswith("python") and words[1:3] == ["-m", "rksc_sgl"]:
        return words[3:]
    return None


def inline_bench_commands(page: Path) -> Iterator[Tuple[int, List[str]]]:
    """``(line, words)`` of every inline ``rksc-sgl bench ... --modes ...`` span outside code
    blocks: the commands that tables (the README's results at a glance) name for their figures."""
    in_code = False
    for number, line in enumerate(page.read_text().splitlines(), 1):
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code:
            for span in re.findall(r"`(rksc-sgl bench [^`]*--modes [^`]*)`", line):
                yield number, shlex.split(span)


def _commands(kind: str):
    found = []
    for page in PAGES:
        inline = list(inline_bench_commands(page)) if kind == "rksc-sgl" else []
        for line, words in [*shell_commands(page), *inline]:
            argv = _rksc_sgl_argv(words)
            sglang = [os.path.basename(w) for w in words[:3]] in (["python", "-m", "sglang.launch_server"],
                                                                   ["python3", "-m", "sglang.launch_server"])
            if (kind == "rksc-sgl" and argv is not None) or (kind == "sglang" and sglang):
                found.append(pytest.param(words, id=f"{page.relative_to(ROOT)}:{line}"))
    return found


def _parses(parse, argv) -> None:
    """``parse(argv)``; a ``--help`` (SystemExit 0) passes, an argparse error fails with its message."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            parse(argv)
    except SystemExit as exc:
        assert exc.code in (0, None), f"{shlex.join(argv)}: {err.getvalue().strip()}"


RKSC_SGL_COMMANDS = _commands("rksc-sgl")
SGLANG_COMMANDS = _commands("sglang")


def test_the_docs_show_commands():
    assert len(RKSC_SGL_COMMANDS) >= 10 and SGLANG_COMMANDS


@pytest.mark.parametrize("words", RKSC_SGL_COMMANDS)
def test_every_rksc_sgl_command_parses(words):
    from rksc_sgl.cli import build_parser

    argv = _rksc_sgl_argv(words)
    if os.path.basename(words[0]) != "rksc-sgl":
        import importlib.util

        assert importlib.util.find_spec("rksc_sgl.__main__"), "python -m rksc_sgl needs rksc_sgl/__main__.py"
    if argv[:1] == ["launch-server"]:
        from rksc_sgl.runtime.launch_plan import sglang_parser
        from rksc_sgl.runtime.launcher import launcher_parser

        ours, rest = launcher_parser().parse_known_args(argv[1:])
        _parses(sglang_parser().parse_args, rest)
        return
    if argv[:1] == ["run"] and "--" in argv:  # what follows `--` is the program's own
        argv = argv[:argv.index("--")]
    parser = build_parser()
    _parses(parser.parse_args, argv)
    if argv[:1] == ["bench"] and "--help" not in argv and "-h" not in argv and "--list" not in argv:
        from rksc_sgl.bench.cli import validate_args

        validate_args(parser.parse_args(argv))  # modes, workloads and server flags, checked before any run


@pytest.mark.parametrize("words", SGLANG_COMMANDS)
def test_every_plain_sglang_command_parses(words):
    """The plain SGLang commands, with SGLang's parser and the plugin registered (as in the server)."""
    from rksc_sgl.runtime.launch_plan import sglang_parser

    _parses(sglang_parser().parse_args, words[3:])


def test_a_bad_command_is_caught(tmp_path):
    from rksc_sgl.cli import build_parser

    with pytest.raises(AssertionError):
        _parses(build_parser().parse_args, ["bench", "--no-such-flag"])
    page = tmp_path / "page.md"
    page.write_text("```bash\nA=1 .venv/bin/rksc-sgl bench \\\n  --problems 2  # a comment\n```\n"
                    "```python\nrksc-sgl not a command here\n```\n")
    assert list(shell_commands(page)) == [(2, [".venv/bin/rksc-sgl", "bench", "--problems", "2"])]
    page.write_text("| x | `rksc-sgl bench --workload vote --modes radix,stop-lossless` | `rksc-sgl bench` |\n")
    assert list(inline_bench_commands(page)) == [(1, ["rksc-sgl", "bench", "--workload", "vote", "--modes",
                                                      "radix,stop-lossless"])]
