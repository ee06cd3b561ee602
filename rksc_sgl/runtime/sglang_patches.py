"""Fixes to SGLang 0.5.23 that a plugin cannot make, shipped as patch files.

``patches/*.patch`` are unified diffs against the installed ``sglang`` package (paths
``a/sglang/...``). They are applied to the installed files with GNU ``patch`` (``git
apply`` where ``patch`` is missing), so the fix reaches every process, including ones
SGLang spawns. ``scripts/setup.sh`` applies them; ``rksc-sgl patch --check`` reports each
patch as applied / not applied / not applicable (a different SGLang version).
"""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
from pathlib import Path
from typing import List, Optional

SGLANG_VERSION = "0.5.23"
APPLIED, NOT_APPLIED, CONFLICT = "applied", "not applied", "does not apply"


@dataclasses.dataclass(frozen=True)
class PatchStatus:
    name: str
    state: str
    detail: str = ""


def patch_dir() -> Path:
    """The patches: ``rksc_sgl/patches`` (package data of a wheel; in a checkout, a link to the
    repository's ``patches/``)."""
    folder = Path(__file__).resolve().parents[1] / "patches"
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found: the SGLang patches ship as rksc_sgl/patches in the package "
                                "(a link to patches/ in a checkout)")
    return folder


def site_dir() -> Path:
    """The folder that holds the installed ``sglang`` package."""
    import importlib.util

    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("sglang is not installed")
    return Path(list(spec.submodule_search_locations)[0]).parent


def patch_files(folder: Optional[Path] = None) -> List[Path]:
    return sorted((folder or patch_dir()).glob("*.patch"))


def _run(patch_file: Path, target: Path, *, reverse: bool = False, dry_run: bool = False):
    if shutil.which("patch"):
        cmd = ["patch", "-p1", "--forward", "--batch", "-s", "-d", str(target), "-i", str(patch_file)]
        cmd += ["-R"] if reverse else []
        cmd += ["--dry-run"] if dry_run else []
    elif shutil.which("git"):
        cmd = ["git", "apply", "-p1", "--unsafe-paths", f"--directory={target}", str(patch_file)]
        cmd += ["-R"] if reverse else []
        cmd += ["--check"] if dry_run else []
    else:
        raise RuntimeError("applying the SGLang patches needs GNU patch or git on PATH")
    return subprocess.run(cmd, capture_output=True, text=True)


def status(target: Optional[Path] = None, folder: Optional[Path] = None) -> List[PatchStatus]:
    """Whether each patch is already in the installed files."""
    target = target or site_dir()
    out = []
    for pf in patch_files(folder):
        if _run(pf, target, reverse=True, dry_run=True).returncode == 0:
            out.append(PatchStatus(pf.name, APPLIED))
        else:
            forward = _run(pf, target, dry_run=True)
            state = NOT_APPLIED if forward.returncode == 0 else CONFLICT
            out.append(PatchStatus(pf.name, state, (forward.stdout + forward.stderr).strip()))
    return out


def apply(target: Optional[Path] = None, folder: Optional[Path] = None) -> List[PatchStatus]:
    """Apply every patch not yet applied; raise if one does not apply cleanly."""
    target = target or site_dir()
    results = []
    for st in status(target, folder):
        if st.state == APPLIED:
            results.append(st)
            continue
        if st.state == CONFLICT:
            raise RuntimeError(f"{st.name} does not apply to the installed sglang "
                               f"(patches are for sglang {SGLANG_VERSION}): {st.detail}")
        done = _run((folder or patch_dir()) / st.name, target)
        if done.returncode != 0:
            raise RuntimeError(f"applying {st.name} failed: {(done.stdout + done.stderr).strip()}")
        results.append(PatchStatus(st.name, APPLIED, "applied now"))
    return results
