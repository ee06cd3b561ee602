"""RKSC on SGLang's runtime where users deploy it: one command on a GPU server.

    pip install sglang==0.5.23 rksc-sgl        # the full SGLang GPU stack
    python benchmarks/gpu_runtime_smoke.py --model-path /path/to/llama-or-qwen-folder
    python benchmarks/gpu_runtime_smoke.py --dry-run   # no GPU: every row's servers planned and checked

Each row starts its servers with ``rksc-sgl launch-server``'s plan (SGLang's defaults on a
GPU: CUDA graphs and the overlap scheduler on) and prints ``PASS``, ``FAIL`` or ``SKIP``
with what it saw:

=====================  ==========================================================================
row                    passes when
=====================  ==========================================================================
asks-recipient         a paraphrased prompt is served through ASKS (semantic hit tokens > 0),
                       and the idle tree is intact (every slot free or in one node, no lock)
rsbcm-pressure         a small pool under many prompts evicts with RSBCM, the attention hook
                       counted passes, the idle tree is intact; ``--tp-size 2`` with 2+ GPUs
cuda-graphs-greedy     greedy token ids of the rksc server (graphs on) equal SGLang's default
                       cache server's, prompt by prompt
seeded-refused         ``RKSC_SEEDED_SAMPLING=1`` with SGLang's default (flashinfer) sampler is
                       refused at start-up with the message, not a crash while serving
seeded-mixed-batch     with the launcher's ``--sampling-backend pytorch``, a seeded request samples
                       the same tokens alone and beside greedy requests
=====================  ==========================================================================

``--dry-run`` (what CI runs on a CPU): plans every row's servers as on a GPU (SGLang's parser
and the plugin's start-up checks), and runs each row's verdict on recorded answers, so the
script cannot rot between GPU runs. Exit status: 0 when no row failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import requests

PROMPTS = ["The capital of France is", "List three prime numbers greater than 50:",
           "Write a Python function that returns the factorial of n.\n",
           "Question: A train travels 60 km in 1.5 hours. What is its average speed?\nAnswer:"]
DONOR = ("You are a careful math tutor. Solve the problem step by step and give the final answer. "
         "Problem: Tom has 12 apples and gives 5 of them to his friend Anna. How many apples does Tom have now?")
RECIPIENT = ("You are a careful math tutor. Solve the problem step by step and give the final answer. "
             "Problem: Tom has 12 pears and gives 5 of them to his friend Anna. How many pears does Tom have now?")
ASKS = '{"tau": 0.8, "recompute_fraction": 0.2}'
GREEDY = {"temperature": 0, "max_new_tokens": 24}


@dataclass
class Row:
    name: str
    verdict: str  # PASS, FAIL or SKIP
    detail: str


# ---- verdicts (pure: --dry-run runs them on recorded answers) ------------------------------------------
def rksc_entries(info: dict) -> List[dict]:
    """Every scheduler's ``rksc`` entry of a ``/server_info`` answer."""
    states = info.get("internal_states") or []
    return [s["rksc"] for s in states if isinstance(s, dict) and isinstance(s.get("rksc"), dict)]


def integrity_problems(entries: List[dict]) -> List[str]:
    problems = [] if entries else ["no rksc entry in /server_info (is the rksc backend on?)"]
    for rank, entry in enumerate(entries):
        check = entry.get("integrity") or {}
        if not check.get("checked"):
            problems.append(f"scheduler {rank}: integrity not checked (busy)")
        elif not check.get("ok"):
            problems.append(f"scheduler {rank}: {check.get('problems')}")
    return problems


def asks_verdict(info: dict) -> Row:
    entries = rksc_entries(info)
    hits = sum(e.get("cache", {}).get("semantic_hit_tokens", 0) for e in entries)
    recipients = sum((e.get("asks") or {}).get("recipients", 0) for e in entries)
    problems = integrity_problems(entries) + ([] if recipients and hits else ["no ASKS recipient was served"])
    return Row("asks-recipient", "FAIL" if problems else "PASS",
               "; ".join(problems) or f"{recipients} recipient(s), {hits} semantic hit tokens, tree intact")


def pressure_verdict(info: dict, tp_size: int) -> Row:
    entries = rksc_entries(info)
    evicted = [e.get("cache", {}).get("evicted_tokens", 0) for e in entries]
    passes = [(e.get("attention") or {}).get("passes", 0) for e in entries]
    problems = integrity_problems(entries)
    if not entries or not all(evicted):
        problems.append(f"no eviction under pressure (evicted tokens per scheduler: {evicted})")
    if not entries or not all(passes):
        problems.append(f"the attention hook counted no pass (per scheduler: {passes})")
    if entries and entries[0].get("eviction_policy") != "rsbcm":
        problems.append(f"eviction policy is {entries[0].get('eviction_policy')!r}, not rsbcm")
    return Row("rsbcm-pressure", "FAIL" if problems else "PASS",
               "; ".join(problems) or f"tp {tp_size}: evicted {evicted} tokens, hook passes {passes}, tree intact")


def greedy_verdict(rksc: Dict[str, List[int]], stock: Dict[str, List[int]]) -> Row:
    differ = [p for p in stock if rksc.get(p) != stock[p]]
    return Row("cuda-graphs-greedy", "FAIL" if differ else "PASS",
               f"{len(stock) - len(differ)}/{len(stock)} prompts give identical greedy ids"
               + (f"; first differing: {differ[0]!r}" if differ else ""))


def refusal_verdict(exit_code: Optional[int], log: str) -> Row:
    message = "RKSC_SEEDED_SAMPLING=1 needs --sampling-backend pytorch"
    if exit_code is None:
        return Row("seeded-refused", "FAIL", "the server started: seeded sampling was not refused")
    if message not in log:
        return Row("seeded-refused", "FAIL", f"exit {exit_code} without the message; last lines: {log[-400:]!r}")
    return Row("seeded-refused", "PASS", f"refused at start-up (exit {exit_code}) with the message")


def seeded_verdict(alone: List[int], mixed: List[int]) -> Row:
    same = alone == mixed
    return Row("seeded-mixed-batch", "PASS" if same else "FAIL",
               f"{len(alone)} tokens {'identical' if same else 'differ'} alone and beside greedy requests")


# ---- talking to a server -----------------------------------------------------------------------------
def generate(url: str, text, params: dict) -> list:
    response = requests.post(f"{url}/generate", json={"text": text, "sampling_params": params}, timeout=600)
    response.raise_for_status()
    answers = response.json()
    return answers if isinstance(answers, list) else [answers]


def output_ids(answer: dict) -> List[int]:
    return list(answer.get("output_ids") or answer["meta_info"].get("output_ids") or [])


def server_info(url: str) -> dict:
    for route in ("/server_info", "/get_server_info"):
        response = requests.get(f"{url}{route}", timeout=60)
        if response.ok:
            return response.json()
    response.raise_for_status()
    return {}


def idle_info(url: str, timeout_s: float = 60.0) -> dict:
    """``/server_info`` once every scheduler's idle check has run."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = server_info(url)
        if all((e.get("integrity") or {}).get("checked") for e in rksc_entries(info)) or time.monotonic() > deadline:
            return info
        time.sleep(0.5)


# ---- the rows --------------------------------------------------------------------------------------------
def row_specs(model: str, tp_size: int) -> Dict[str, dict]:
    """What each row launches: ``plan_launch``'s arguments."""
    from rksc_sgl.runtime.asks_settings import asks_config_from_env

    base = ["--model-path", model, "--host", "127.0.0.1"]
    return {
        "asks": dict(argv=base + ["--chunked-prefill-size", "4096"], asks=asks_config_from_env({"RKSC_ASKS": ASKS})),
        "pressure": dict(argv=base + ["--tp-size", str(tp_size), "--max-total-tokens", "2048"]),
        "stock": dict(argv=base + ["--tp-size", str(tp_size)], rksc_cache=False),
        "seeded": dict(argv=base, seeded_sampling=True),
    }


def plan(spec: dict, *, port: int, cuda: bool, sgl_kernel: bool):
    from rksc_sgl.runtime.launch_plan import plan_launch

    kwargs = {k: v for k, v in spec.items() if k != "argv"}
    return plan_launch([*spec["argv"], "--port", str(port)], cuda=cuda, sgl_kernel_installed=sgl_kernel, **kwargs)


def run_rows(model: str, timeout_s: float, out_dir: str) -> List[Row]:
    import torch

    from rksc_sgl.runtime.server_process import free_port

    gpus = torch.cuda.device_count()
    tp_size = 2 if gpus >= 2 else 1
    specs = row_specs(model, tp_size)
    rows: List[Row] = []

    def with_server(key: str, body: Callable[[str], Row]) -> Row:
        from rksc_sgl.runtime.server_process import RuntimeServer

        log = open(os.path.join(out_dir, f"{key}.log"), "w")
        try:
            server = RuntimeServer(plan(specs[key], port=free_port(), cuda=True, sgl_kernel=True),
                                   startup_timeout=timeout_s, log=log).start()
        except Exception as exc:  # a server that does not start fails its row
            log.close()
            return Row(key, "FAIL", f"server did not start: {exc}")
        try:
            return body(server.url)
        except Exception as exc:
            return Row(key, "FAIL", f"{type(exc).__name__}: {exc}")
        finally:
            server.stop()
            log.close()

    def asks(url: str) -> Row:
        generate(url, DONOR, GREEDY)
        generate(url, RECIPIENT, GREEDY)
        return asks_verdict(idle_info(url))

    rows.append(with_server("asks", asks))

    def pressure(url: str) -> Row:
        for i in range(24):
            generate(url, [f"Request {i}.{j}: " + " ".join(["word"] * 120) for j in range(4)], GREEDY)
        return pressure_verdict(idle_info(url), tp_size)

    rows.append(with_server("pressure", pressure))
    greedy: Dict[str, Dict[str, List[int]]] = {}
    for key in ("pressure", "stock"):
        def collect(url: str, key=key) -> Row:
            greedy[key] = {p: output_ids(a) for p, a in zip(PROMPTS, generate(url, PROMPTS, GREEDY))}
            return Row(key, "PASS", "")
        result = with_server(key, collect)
        if result.verdict == "FAIL":
            rows.append(Row("cuda-graphs-greedy", "FAIL", result.detail))
            break
    else:
        rows.append(greedy_verdict(greedy["pressure"], greedy["stock"]))
    rows.append(seeded_refusal(model, timeout_s))

    def seeded(url: str) -> Row:
        params = {"temperature": 1.0, "top_p": 0.9, "max_new_tokens": 24, "sampling_seed": 1234}
        alone = output_ids(generate(url, PROMPTS[0], params)[0])
        batch = requests.post(f"{url}/generate", json={"text": [PROMPTS[0], PROMPTS[1], PROMPTS[2]],
                                                       "sampling_params": [params, GREEDY, GREEDY]}, timeout=600)
        batch.raise_for_status()
        return seeded_verdict(alone, output_ids(batch.json()[0]))

    rows.append(with_server("seeded", seeded))
    return rows


def seeded_refusal(model: str, timeout_s: float) -> Row:
    """The plain SGLang command with seeded sampling and SGLang's default sampler."""
    import signal

    from rksc_sgl.runtime.server_process import free_port

    command = [sys.executable, "-m", "sglang.launch_server", "--model-path", model, "--radix-cache-backend", "rksc",
               "--port", str(free_port())]
    process = subprocess.Popen(command, env={**os.environ, "RKSC_SEEDED_SAMPLING": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=min(timeout_s, 300))
        return refusal_verdict(process.returncode, log)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return refusal_verdict(None, "")


# ---- dry run ----------------------------------------------------------------------------------------------
RECORDED_INFO = {"internal_states": [{"rksc": {
    "eviction_policy": "rsbcm", "cache": {"semantic_hit_tokens": 9, "evicted_tokens": 512},
    "attention": {"passes": 40}, "asks": {"recipients": 1},
    "integrity": {"checked": True, "ok": True, "problems": []}}}]}


def dry_run(model: str) -> List[Row]:
    """Every row's servers planned as on a 2-GPU server, and every verdict on recorded answers."""
    rows = []
    for key, spec in row_specs(model, 2).items():
        try:
            launch = plan(spec, port=30000, cuda=True, sgl_kernel=True)
            rows.append(Row(f"plan {key}", "PASS", launch.shell_command()))
        except Exception as exc:
            rows.append(Row(f"plan {key}", "FAIL", f"{type(exc).__name__}: {exc}"))
    # The plain command's refusal, as the plugin's hook on SGLang's argument check runs it.
    from rksc_sgl.runtime.launch_plan import sglang_parser
    from rksc_sgl.runtime.support import unsupported

    problems = unsupported(sglang_parser().parse_args(["--model-path", model, "--sampling-backend", "flashinfer"]),
                           {"RKSC_SEEDED_SAMPLING": "1"})
    rows.append(refusal_verdict(1, "; ".join(problems)))
    checks = [asks_verdict(RECORDED_INFO), pressure_verdict(RECORDED_INFO, 2),
              greedy_verdict({"a": [1, 2]}, {"a": [1, 2]}), seeded_verdict([3, 4], [3, 4])]
    failing = [asks_verdict({}), pressure_verdict({"internal_states": []}, 1), greedy_verdict({"a": [1]}, {"a": [2]}),
               seeded_verdict([3], [4]), refusal_verdict(None, "")]
    rows += [Row(f"verdict {r.name}", r.verdict, r.detail) for r in checks]
    rows += [Row(f"verdict {r.name} (broken answers)", "PASS" if r.verdict == "FAIL" else "FAIL", r.detail)
             for r in failing]
    return rows


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default="smollm2-135m", help="a local Hugging Face model folder")
    parser.add_argument("--dry-run", action="store_true", help="no GPU: plan every row and check the verdicts")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a server may take to start")
    parser.add_argument("--out-dir", default="gpu_runtime_smoke", help="server logs and results.json")
    args = parser.parse_args(argv)
    if args.dry_run:
        rows = dry_run(args.model_path)
    else:
        import torch

        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --dry-run on a machine without a GPU")
        os.makedirs(args.out_dir, exist_ok=True)
        rows = run_rows(args.model_path, args.timeout, args.out_dir)
        with open(os.path.join(args.out_dir, "results.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(0), "gpus": torch.cuda.device_count(),
                       "rows": [r.__dict__ for r in rows]}, f, indent=2)
    width = max(len(r.name) for r in rows)
    for r in rows:
        print(f"{r.verdict:4}  {r.name:{width}}  {r.detail}")
    return 1 if any(r.verdict == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
