"""The embedded engine's YES/NO verifier pass, with layer exit (CGEE gate 2).

One batched forward scores, for every prompt, the next-token judgement "Yes" vs "No".
It runs through the engine's own KV pool: each prompt's longest cached prefix (the
branch's conversation, already in the radix tree after the branch was generated) is
locked and read, only the new tokens (the verifier turn) are computed, into temporary
slots that are freed afterwards and never enter the tree (a pass that stopped early has
no KV for its upper layers, so nothing of it may be cached).

Layers run one at a time. After each layer the *logit lens* reads the YES/NO
distribution at each prompt's last token: the model's final norm, then the LM head
(only the YES/NO rows of it). Its binary entropy is tracked; once a prompt's verdict
has had the same argmax with entropy <= ``entropy_bits`` for ``window`` consecutive
layers (and at least ``min_layer`` layers ran), that prompt leaves the batch: its
remaining layers are not run at all. At the last layer the lens *is* the model's real
output (norm + LM head), so with the exit off the result is the plain full pass.

Token choice: SmolLM2's tokenizer splits "YES" into two tokens ("Y" + "ES"), so the
verdict words are "Yes"/"yes" against "No"/"no", each a single token right after the
assistant prefix; a side's logit is the logsumexp of its words' logits, and
``p_yes = P(yes side | yes side or no side)``. Words that are not one token are skipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from rksc_sgl.model.runner import ForwardItem

YES_WORDS = ("Yes", "yes")
NO_WORDS = ("No", "no")


@dataclasses.dataclass(frozen=True)
class ExitPolicy:
    """When a prompt may leave the verifier pass early (``enabled=False``: never)."""

    enabled: bool = True
    entropy_bits: float = 0.2
    window: int = 3
    min_layer: int = 1

    def __post_init__(self):
        if not 0.0 <= self.entropy_bits <= 1.0:
            raise ValueError(f"entropy_bits must be in [0, 1] (binary entropy), got {self.entropy_bits}")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")
        if self.min_layer < 1:
            raise ValueError(f"min_layer must be >= 1, got {self.min_layer}")


@dataclasses.dataclass
class YesNoScore:
    """The verdict of one prompt: P(yes) at the layer it exited, and what it cost."""

    p_yes: float
    layers_run: int
    num_layers: int
    new_tokens: int = 0
    cached_tokens: int = 0
    trace: Optional[List[tuple]] = None  # per layer (p_yes, entropy_bits), when traced

    @property
    def verdict(self) -> str:
        return "YES" if self.p_yes >= 0.5 else "NO"

    @property
    def exited_early(self) -> bool:
        return self.layers_run < self.num_layers


def verdict_token_ids(tokenizer, yes_words: Sequence[str] = YES_WORDS,
                      no_words: Sequence[str] = NO_WORDS) -> tuple:
    """``(yes_ids, no_ids)``: the single-token encodings of the verdict words."""
    def ids(words):
        out = []
        for w in words:
            enc = tokenizer.encode(w, add_special_tokens=False)
            if len(enc) == 1 and enc[0] not in out:
                out.append(enc[0])
        return out
    yes, no = ids(yes_words), ids(no_words)
    if not yes or not no or set(yes) & set(no):
        raise ValueError(f"verdict words must include single, distinct tokens: yes={yes_words} no={no_words}")
    return yes, no


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-12, 1 - 1e-12)
    return -(p * torch.log2(p) + (1 - p) * torch.log2(1 - p))


class LayerExitVerifier:
    """Batched YES/NO pass over a ``ModelRunner`` and ``KVCacheManager``.

    Call :meth:`score` on the scheduler thread only (``Engine.verify_yes_no`` does).
    """

    def __init__(self, runner, kv, yes_ids: List[int], no_ids: List[int]):
        self.runner = runner
        self.kv = kv
        self.yes_ids = list(yes_ids)
        self.no_ids = list(no_ids)
        weight = runner.lm_head.weight
        self._rows = torch.tensor(self.yes_ids + self.no_ids)
        self._w = weight[self._rows]  # (k, H): the LM head restricted to the verdict words
        bias = getattr(runner.lm_head, "bias", None)
        self._b = bias[self._rows] if bias is not None else None
        self.num_layers = len(runner.layers)

    def lens(self, hidden_last: torch.Tensor) -> torch.Tensor:
        """Logit lens at some layer: final norm, then the LM head's verdict rows -> p_yes."""
        logits = F.linear(self.runner.norm(hidden_last), self._w, self._b).float()
        k = len(self.yes_ids)
        yes = torch.logsumexp(logits[:, :k], dim=-1)
        no = torch.logsumexp(logits[:, k:], dim=-1)
        return torch.sigmoid(yes - no)

    @torch.inference_mode()
    def score(self, prompts: List[List[int]], policy: ExitPolicy, trace: bool = False) -> List[YesNoScore]:
        kv = self.kv
        with contextlib.ExitStack() as held:  # scratch slots freed, then the locks released
            matched = []
            for ids in prompts:
                if not ids:
                    raise ValueError("empty verifier prompt")
                prefix, node = kv.match(ids, len(ids) - 1)  # at least one token is computed
                lock = kv.tree.lock(node)  # before any alloc can evict it
                held.callback(kv.tree.unlock, lock)
                matched.append(prefix)
            items = []
            for ids, prefix in zip(prompts, matched):
                new = ids[len(prefix):]
                slots = held.enter_context(kv.scratch(len(new)))
                items.append(ForwardItem(list(new), len(prefix), torch.cat([prefix.to(torch.int64), slots])))
            return self._forward(items, policy, trace)

    def _forward(self, items: List[ForwardItem], policy: ExitPolicy, trace: bool) -> List[YesNoScore]:
        runner = self.runner
        L = self.num_layers
        results: List[Optional[YesNoScore]] = [None] * len(items)
        traces = [[] for _ in items] if trace else None
        history = [[] for _ in items]  # (argmax, entropy) per layer
        active = list(range(len(items)))

        layer_pass = runner.start(items)
        watch = policy.enabled or trace
        while True:
            hidden = layer_pass.run_block()
            run = layer_pass.layers_run
            if run == L:
                p = self.lens(hidden[0, layer_pass.last_rows])
                for j, i in enumerate(active):
                    if trace:
                        traces[i].append((float(p[j]), float(binary_entropy_bits(p[j]))))
                    results[i] = YesNoScore(float(p[j]), L, L)
                break
            if not watch:
                continue
            p = self.lens(hidden[0, layer_pass.last_rows])
            ent = binary_entropy_bits(p)
            leaving = []
            for j, i in enumerate(active):
                history[i].append((bool(p[j] >= 0.5), float(ent[j])))
                if trace:
                    traces[i].append((float(p[j]), float(ent[j])))
                if policy.enabled and should_exit(history[i], policy):
                    results[i] = YesNoScore(float(p[j]), run, L)
                    leaving.append(j)
            if leaving:
                keep = [j for j in range(len(active)) if j not in leaving]
                if not keep:
                    break
                active = [active[j] for j in keep]
                layer_pass.keep(keep)
        for i, (res, it) in enumerate(zip(results, items)):
            res.new_tokens = len(it.token_ids)
            res.cached_tokens = it.start
            if trace:
                res.trace = traces[i]
        return results


def should_exit(history: List[tuple], policy: ExitPolicy) -> bool:
    """``history``: (argmax is yes, entropy bits) per layer run so far."""
    if len(history) < max(policy.min_layer, policy.window):
        return False
    recent = history[-policy.window:]
    first = recent[0][0]
    return all(a == first and e <= policy.entropy_bits for a, e in recent)


def simulate_exit(trace: List[tuple], policy: ExitPolicy) -> tuple:
    """Replay a full-pass trace under ``policy``: ``(p_yes, layers_run)`` it would give."""
    history = []
    for layer, (p, e) in enumerate(trace[:-1], start=1):
        history.append((p >= 0.5, e))
        if policy.enabled and should_exit(history, policy):
            return p, layer
    return trace[-1][0], len(trace)


def wilson_interval(k: int, n: int, z: float = 1.959964) -> tuple:
    """95% Wilson score interval of a proportion ``k/n`` (``(0, 1)`` when ``n == 0``)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)
