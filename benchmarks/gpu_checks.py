"""The GPU checks of the embedded engine, as one command on a CUDA machine.

    python benchmarks/gpu_checks.py            # writes benchmarks/scratch/gpu_checks.json (--out)

1. Greedy agreement: the same prompts (plain and a fork whose branches decode together
   over a shared prefix) on the CPU engine (float32, torch attention) and on the GPU
   engine, once with torch attention in float32 and once with FlashInfer in bfloat16
   (against a CPU bfloat16 run, so that only the kernels differ).
2. The ``paper`` workload timed for ``none``, ``radix`` and ``rksc`` on the GPU engine
   (``rksc_sgl.bench``, same process, same problems); ASKS's answer agreement with radix on
   ``paraphrase`` (held-out seed 1000) in the GPU's bfloat16; and one fork program timed with
   the shared-prefix (cascade) pass on and off, FlashInfer and torch attention.
3. The real SGLang runtime (``sglang.launch_server`` with dummy weights) with
   ``--radix-cache-backend rksc --radix-eviction-policy rsbcm`` serving a fork program,
   when the full SGLang GPU stack (``sgl_kernel``) is installed; otherwise the JSON says
   why it was skipped.

The results file records the card, the versions and every setting.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from rksc_sgl.gpu_stack import install_sgl_kernel_standin, standin_active

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "scratch" / "gpu_checks.json"

PROMPTS = [
    "The capital of France is",
    "Question: A train travels 60 km in 1.5 hours. What is its average speed?\nAnswer:",
    "Write a Python function that returns the factorial of n.\n",
    "List three prime numbers greater than 50:",
]


def environment(sgl_kernel: str) -> Dict[str, Any]:
    import torch

    info = {
        "card": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "sgl_kernel": sgl_kernel,
    }
    for name in ("sglang", "flashinfer", "transformers"):
        try:
            info[name] = __import__(name).__version__
        except Exception as exc:  # recorded, not fatal
            info[name] = f"unavailable: {type(exc).__name__}: {exc}"[:200]
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        info["nvidia_smi"] = None
    return info


def _greedy(engine, max_tokens: int) -> Dict[str, List[int]]:
    import sglang as sgl

    outs = {}
    for i, prompt in enumerate(PROMPTS):
        res = engine.generate_request(prompt, sampling_params={"max_new_tokens": max_tokens, "temperature": 0})
        outs[f"prompt{i}"] = res["output_ids"]

    @sgl.function
    def forked(s, question):
        s += "Think about this problem carefully. " * 12 + question
        branches = s.fork(4)
        for j, br in enumerate(branches):
            br += f" Approach {j + 1}:" + sgl.gen("step", max_tokens=max_tokens, temperature=0)
        branches.join()  # gathers each branch's "step" into a list

    state = forked.run(question="What is 23 * 19?", backend=engine)
    for j, text in enumerate(state["step"]):
        outs[f"fork_branch{j}"] = engine.tokenizer.encode(text, add_special_tokens=False)
    return outs


def compare(reference: Dict[str, List[int]], other: Dict[str, List[int]]) -> Dict[str, Any]:
    rows = {}
    for key, ref in reference.items():
        got = other.get(key, [])
        same = 0
        for a, b in zip(ref, got):
            if a != b:
                break
            same += 1
        rows[key] = {"identical": ref == got, "tokens": len(ref), "agree_before_first_difference": same}
    rows_all = list(rows.values())
    return {"identical": sum(r["identical"] for r in rows_all), "of": len(rows_all), "per_prompt": rows}


def greedy_checks(model: str, max_tokens: int) -> Dict[str, Any]:
    import rksc_sgl

    def run(**kwargs):
        engine = rksc_sgl.Engine(model=model, cache="radix", kv_pool_tokens=16384, **kwargs)
        try:
            out = _greedy(engine, max_tokens)
            engine.check_integrity()
            return out, {k: getattr(engine.config, k) for k in ("device", "dtype", "attention_backend")}
        finally:
            engine.shutdown()

    results = {}
    runs = {"cpu_float32": run(device="cpu", dtype="float32"), "cpu_bfloat16": run(device="cpu", dtype="bfloat16")}
    for label, kwargs in (("gpu_torch_float32", {"dtype": "float32", "attention_backend": "torch"}),
                          ("gpu_torch_bfloat16", {"dtype": "bfloat16", "attention_backend": "torch"}),
                          ("gpu_flashinfer_bfloat16", {"dtype": "bfloat16", "attention_backend": "flashinfer"})):
        try:
            runs[label] = run(device="cuda", **kwargs)
        except Exception as exc:
            results[label] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    # The float32 pair shows the GPU engine exact; the bfloat16 pairs separate what the
    # FlashInfer kernels change from what bfloat16 on another device changes anyway.
    for gpu, ref in (("gpu_torch_float32", "cpu_float32"), ("gpu_torch_bfloat16", "cpu_bfloat16"),
                     ("gpu_flashinfer_bfloat16", "cpu_bfloat16"), ("gpu_flashinfer_bfloat16", "gpu_torch_bfloat16")):
        if gpu in runs and ref in runs:
            results[f"{gpu}_vs_{ref}"] = {"a": runs[gpu][1], "b": runs[ref][1], **compare(runs[ref][0], runs[gpu][0])}
    results["max_new_tokens"] = max_tokens
    return results


def workload_run(workload: str, modes: str, model: str, problems: int, repeats: int, seed: int = 0,
                 device: str = "cuda", **params) -> Dict[str, Any]:
    """An ``rksc-sgl bench`` workload with the engines on the GPU (bfloat16, FlashInfer).

    ``params`` override the workload's (a short dry run on the CPU: ``device="cpu"``).
    """
    from rksc_sgl import bench

    settings = bench.BenchSettings(problems=problems, repeats=repeats, seed=seed, model=model, device=device,
                                   params=params)
    result = bench.run_bench(workload, modes, settings, progress=True, command="python benchmarks/gpu_checks.py")
    last = bench.parse_modes(modes)[-1].label
    result["gpu_engine"] = {k: result["engine_configs"][last][k] for k in ("device", "dtype", "attention_backend")}
    result["table"] = bench.markdown_report(result)
    return result


CASCADE_CONFIGS = (
    ("none_flashinfer", {"cache": "none", "attention_backend": "flashinfer"}),
    ("radix_flashinfer_cascade", {"cache": "radix", "attention_backend": "flashinfer"}),
    ("radix_flashinfer_no_cascade", {"cache": "radix", "attention_backend": "flashinfer", "shared_prefix_min_tokens": 0}),
    ("radix_torch_cascade", {"cache": "radix", "attention_backend": "torch"}),
    ("radix_torch_no_cascade", {"cache": "radix", "attention_backend": "torch", "shared_prefix_min_tokens": 0}),
)


def cascade_timings(model: str, repeats: int, branches: int = 8, prefix_words: int = 180, max_tokens: int = 32,
                    device: str = "cuda", dtype: str = "bfloat16", configs=CASCADE_CONFIGS) -> Dict[str, Any]:
    """What the shared-prefix pass is worth: one fork program timed with it on and off.

    ``branches`` branches of a shared prompt (about 1.1 tokens per word) decode ``max_tokens`` tokens each
    (EOS ignored, so every configuration computes the same number of tokens); the cache is
    flushed before every run. All configurations are built in this process and run in turn,
    round-robin, ``repeats`` times after one warm-up each; medians are reported.
    """
    import statistics

    import sglang as sgl
    import rksc_sgl

    @sgl.function
    def fork_program(s, question):
        s += " ".join(["Read the question and think step by step before answering."] * (prefix_words // 10))
        s += "\n" + question
        forks = s.fork(branches)
        for j, br in enumerate(forks):
            br += f" Approach {j + 1}:" + sgl.gen("step", max_tokens=max_tokens, min_tokens=max_tokens,
                                                  ignore_eos=True, temperature=0)
        forks.join()

    engines = {}
    try:
        for label, kwargs in configs:
            if device == "cpu":
                kwargs = {**kwargs, "attention_backend": "torch"}
            engines[label] = rksc_sgl.Engine(model=model, device=device, dtype=dtype, kv_pool_tokens=16384, **kwargs)
        seconds = {label: [] for label in engines}
        for rep in range(repeats + 1):
            for label, engine in engines.items():
                engine.flush_cache()
                started = time.perf_counter()
                fork_program.run(question=f"What is {17 + rep} * 23?", backend=engine)
                if device == "cuda":
                    import torch

                    torch.cuda.synchronize()
                if rep:  # the first round is the warm-up
                    seconds[label].append(time.perf_counter() - started)
                engine.check_integrity()
        medians = {label: statistics.median(v) for label, v in seconds.items()}
        base = medians[next(iter(medians))]
        return {"branches": branches, "max_new_tokens": max_tokens, "dtype": dtype, "repeats": repeats,
                "configs": dict(configs), "seconds": seconds, "median_s": medians,
                "x_first": {label: base / m for label, m in medians.items()}}
    finally:
        for engine in engines.values():
            engine.shutdown()


CASCADE_SWEEP = ((900, 8), (900, 32), (3600, 32))
"""(prompt words, branches) beyond the default (180 words, about 210 tokens with the
question): about 1000 and 4000 prompt tokens."""


def cascade_sweep(model: str, repeats: int, device: str = "cuda", dtype: str = "bfloat16") -> Dict[str, Any]:
    """The five configurations at the default size, then FlashInfer with the shared-prefix
    pass on and off at larger prompts and more branches: where does the pass start to pay?"""
    result = {"default_size": cascade_timings(model, repeats, device=device, dtype=dtype)}
    for words, branches in CASCADE_SWEEP:
        result[f"words{words}_branches{branches}"] = cascade_timings(
            model, repeats, branches=branches, prefix_words=words, device=device, dtype=dtype,
            configs=CASCADE_CONFIGS[1:3])
    return result


def runtime_check(timeout_s: int = 300) -> Dict[str, Any]:
    """``sglang.launch_server`` with the RKSC cache and RSBCM eviction, serving a fork program.

    The server gets the packaged model's converted folder (``RKSC_GPU_RUNTIME_MODEL``
    overrides it) with dummy weights, so nothing is downloaded; the result records what
    the server says its cache backend and eviction policy are, and how many prompt tokens
    a repeated request found in the cache (it must be above zero).
    """
    if importlib.util.find_spec("sgl_kernel") is None or standin_active():
        return {"skipped": "the SGLang GPU runtime needs sglang-kernel (and torch 2.14.1); not installed here"}
    import sglang as sgl

    port = _free_port()
    cmd = [sys.executable, "-m", "sglang.launch_server", "--model-path", runtime_model_dir(), "--load-format", "dummy",
           "--port", str(port), "--radix-cache-backend", "rksc", "--radix-eviction-policy", "rsbcm",
           "--mem-fraction-static", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        endpoint = _wait_for_server(port, proc, timeout_s)

        @sgl.function
        def forked(s):
            s += "Shared question: what is 2 + 2? " * 8
            forks = s.fork(3)
            for br in forks:
                br += sgl.gen("answer", max_tokens=8, temperature=0)
            forks.join()

        state = forked.run(backend=endpoint)
        return {"command": " ".join(cmd), "served": True, "text_chars": len(state.text()),
                "server_cache": _server_cache_settings(port),
                "repeat_cached_tokens": _repeat_cached_tokens(port)}
    except Exception as exc:
        return {"command": " ".join(cmd), "served": False, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def runtime_model_dir() -> str:
    """The folder the runtime check serves: ``RKSC_GPU_RUNTIME_MODEL``, else the packaged model."""
    return os.environ.get("RKSC_GPU_RUNTIME_MODEL") or str(packaged_model_folder())


def packaged_model_folder() -> Path:
    """The packaged model converted to a Hugging Face folder (in the rksc-sgl cache)."""
    from rksc_sgl.config import default_cache_dir
    from rksc_sgl.model.loading import resolve_model_dir

    return resolve_model_dir("smollm2-135m", default_cache_dir())


TOKENIZER_FILES = ("tokenizer", "chat_template", "special_tokens")
"""Name prefixes of a model folder's tokenizer files."""


def copy_tokenizer(model_dir: Path, dest: Path) -> None:
    """``model_dir``'s tokenizer files into ``dest``."""
    import shutil

    dest.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():
        if f.name.startswith(TOKENIZER_FILES):
            shutil.copy(f, dest / f.name)


def _server_cache_settings(port: int) -> Dict[str, Any]:
    import requests

    info = requests.get(f"http://127.0.0.1:{port}/server_info", timeout=30).json()
    return {k: info.get(k) for k in ("radix_cache_backend", "radix_eviction_policy", "disable_radix_cache",
                                     "launch_command")}


def _repeat_cached_tokens(port: int) -> Any:
    """The second of two identical requests: its prompt tokens served from the radix cache."""
    import requests

    body = {"text": "A prompt sent twice, so the second finds it cached. " * 6,
            "sampling_params": {"max_new_tokens": 4, "temperature": 0}}
    for _ in range(2):
        reply = requests.post(f"http://127.0.0.1:{port}/generate", json=body, timeout=60).json()
    return reply.get("meta_info", {}).get("cached_tokens")


def tiny_model(out_dir: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A two-layer Llama with random weights and the packaged model's tokenizer.

    A smoke test of the GPU engine (CUDA pools, FlashInfer's JIT build and kernels) that
    can run before the real weights have reached an offline machine. Its head size (64) is
    the real model's, so FlashInfer's compiled kernels are the ones the real run uses.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=192, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).save_pretrained(out_dir)
    copy_tokenizer(tokenizer_dir, out_dir)
    return out_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_server(port: int, proc, timeout_s: int):
    import sglang as sgl

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            return sgl.RuntimeEndpoint(f"http://127.0.0.1:{port}")
        except Exception:
            time.sleep(2)
    raise TimeoutError(f"server did not answer within {timeout_s}s")


STEPS = ("greedy", "paper", "asks", "cascade", "runtime")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--problems", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--asks-problems", type=int, default=80, help="paraphrase problems (seed 1000) for ASKS")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--skip", default="", help=f"comma-separated steps to leave out: {','.join(STEPS)}")
    parser.add_argument("--tiny-from", type=Path, default=None, metavar="TOKENIZER_DIR",
                        help="smoke test: a random two-layer model with this tokenizer replaces --model")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(STEPS):
        parser.error(f"--skip {args.skip!r}: the steps are {', '.join(STEPS)}")
    import torch

    if not torch.cuda.is_available():
        parser.error("no CUDA GPU: these checks run on a GPU machine")
    if args.tiny_from is not None:
        args.model = str(tiny_model(Path("/tmp/rksc_tiny_model"), args.tiny_from))
    report: Dict[str, Any] = {"environment": environment(install_sgl_kernel_standin()), "settings": vars(args) | {"out": str(args.out)}}
    for name, step in (("greedy", lambda: greedy_checks(args.model, args.max_tokens)),
                       ("paper", lambda: workload_run("paper", "none,radix,rksc", args.model, args.problems,
                                                      args.repeats)),
                       ("asks", lambda: workload_run("paraphrase", "radix,asks", args.model, args.asks_problems, 1,
                                                     seed=1000)),
                       ("cascade", lambda: cascade_sweep(args.model, args.repeats * 2)),
                       ("runtime", runtime_check)):
        if name in skip:
            report[name] = {"skipped": "--skip"}
            continue
        print(f"[gpu_checks] {name} ...", flush=True)
        started = time.time()
        try:
            report[name] = step()
        except Exception as exc:
            import traceback

            report[name] = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-4000:]}
        report[name + "_seconds"] = round(time.time() - started, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str))  # after every step: partial results survive
        print(json.dumps({name: report[name]}, indent=1, default=str)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
