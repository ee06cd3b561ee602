"""``pressure``: concurrent programs sharing a prefix on a pool below their working set."""

from __future__ import annotations

from typing import List

from rksc_sgl.problems import load_problems, majority_vote
from rksc_sgl.bench.inputs import extract_final, few_shot_problem, hints_for, program
from rksc_sgl.bench.workload import Item, Outcome, Target, Workload, fewer_prefill, hit_rate_margin, register


@register
class PressureWorkload(Workload):
    name = "pressure"
    summary = "RSBCM: concurrent multi-branch programs on a KV pool below their working set"
    help = ("RSBCM: each problem is a batch of concurrent multi-branch programs that share a few-shot prefix "
            "(programs x branches hinted branches), on a KV pool of pool_fraction of the run's working set; "
            "problems cycle through `prefixes` different few-shot blocks and the cache is kept across "
            "problems, so what eviction kept decides the hits")
    defaults = {"programs": 2, "branches": 4, "max_tokens": 32, "prompt_tokens": 600, "pool_fraction": 0.25,
                "prefixes": 3, "temperature": 0.0, "fork_commit": 0}
    runtime_defaults = {"fork_commit": 1}
    """On the runtime each program commits its prompt before its fork, as SGLang's ``fork`` does:
    without it a batch of branches each prefills the whole prompt, and those copies fill the pool
    under every eviction policy alike."""
    flush_between_problems = False

    def resolve(self, overrides, backend="engine"):
        params = super().resolve(overrides, backend)
        if params["fork_commit"] not in (0, 1):
            raise ValueError(f"fork-commit must be 0 or 1, got {params['fork_commit']!r}")
        return params

    def items(self, tokenizer, params, seed, count):
        # ``prefixes`` few-shot blocks (seeds seed, seed+1, ...); problem i uses block
        # i % prefixes, so a block comes back after the others were used, and whether it is
        # still cached is what the eviction policy decided meanwhile.
        blocks = []
        for b in range(params["prefixes"]):
            prompt, _ = few_shot_problem(tokenizer, params["prompt_tokens"], seed + 7919 * b)
            blocks.append(prompt.rsplit("\n\nQuestion: ", 1)[0] + "\n\n")
        out = []
        questions = load_problems("gsm_symbolic", count * params["programs"], seed + 1)
        for i in range(count):
            shared = blocks[i % len(blocks)]
            group = questions[i * params["programs"]:(i + 1) * params["programs"]]
            prompts = [f"{shared}Question: {q.question}\nAnswer: Let's think step by step.\n" for q in group]
            out.append(Item(i, group[0], {"prompts": prompts, "shared_tokens": len(tokenizer.encode(shared)),
                                          "block": i % len(blocks),
                                          "prompt_tokens": [len(tokenizer.encode(p)) for p in prompts]}))
        return out

    def working_set(self, params, items: List[Item], tokenizer) -> int:
        """Distinct KV tokens of all the run's programs: each few-shot block once, each program's
        question, and every branch's hint and new tokens."""
        if not items:
            return 0
        hint = max(len(tokenizer.encode(h + "\n")) for h in hints_for(params["branches"]))
        per_branch = hint + params["max_tokens"]
        blocks = {item.inputs["block"]: item.inputs["shared_tokens"] for item in items}
        total = sum(blocks.values())
        for item in items:
            shared = item.inputs["shared_tokens"]
            for n in item.inputs["prompt_tokens"]:
                total += (n - shared) + params["branches"] * per_branch
        return total

    def engine_overrides(self, tokenizer, params, items):
        need = self.working_set(params, items, tokenizer)
        longest = max(n for it in items for n in it.inputs["prompt_tokens"]) + 32 + params["max_tokens"]
        return {"kv_pool_tokens": max(int(need * params["pool_fraction"]), longest * 2)}

    def run(self, engine, item, params, cgee, audit_log, stop=None):
        hints = hints_for(params["branches"])
        states = program("hinted_branches").run_batch(
            [{"prompt": p, "hints": hints, "max_tokens": params["max_tokens"],
              "sample_temperature": params["temperature"], "fork_commit": bool(params["fork_commit"])}
             for p in item.inputs["prompts"]], backend=engine, num_threads=len(item.inputs["prompts"]))
        outputs, answers = [], []
        for st in states:
            texts = list(st["answer"])
            outputs.extend(texts)
            answers.append(majority_vote([extract_final(t) for t in texts]))
        # The first program's problem is the item's; the others' answers count in the outputs.
        return Outcome(answers[0], outputs)

    def targets(self):
        # The targets, stated for a pool of 25% of the working set.
        return [Target("rsbcm hit rate minus the best other mode's", hit_rate_margin("rsbcm"), ">=", 0.0),
                Target("rsbcm: x fewer prefill tokens than LRU (radix; run totals; at pool 25%)",
                       fewer_prefill("radix", "rsbcm"), ">=", 1.2)]
