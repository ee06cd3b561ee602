"""The embedded engine made to take the runtime's compression decisions: each compaction of
the engine keeps (and, for ``cask``, merges) the original positions that the runtime's
``/server_info`` recorded for the same request, so the two backends' continuations, KV and
scores can be compared token for token; and ``transformers`` made to delete the same cache
entries, the reference that needs neither backend."""

from __future__ import annotations

from typing import List, Tuple

import torch

from rksc_sgl.rksc import compression as compression_module


def candidate_origins(events: List[dict], k: int, prompt: int, buffer: int) -> List[int]:
    """The original positions of event ``k``'s candidates: the kept ones of the event before,
    then the run from there to ``buffer`` before the newest token."""
    before = events[k - 1] if k else {"decoded": buffer, "kept": []}
    return before["kept"] + list(range(prompt + before["decoded"] - buffer, prompt + events[k]["decoded"] - buffer))


def replay_decisions(monkeypatch, events: List[dict], prompt: int, buffer: int) -> List[int]:
    """Patch the engine's ``plan`` to replay ``events`` in order; the returned list grows by one
    index per replayed event (a compaction after the last one, past the last forward, keeps the
    newest candidates). Each event's candidates must be the engine's, checked as it replays."""
    used: List[int] = []

    def replay(config, importance, keys, keep_count):
        k = len(used)
        if k == len(events):
            return compression_module.Plan(list(range(importance.shape[0] - keep_count, importance.shape[0])))
        origins = candidate_origins(events, k, prompt, buffer)
        assert len(origins) == importance.shape[0] and keep_count == len(events[k]["kept"])
        used.append(k)
        index = {o: i for i, o in enumerate(origins)}
        kept = set(events[k]["kept"])
        merges = [(index[d], index[t]) for d, t in events[k].get("merged", [])]
        return compression_module.Plan([i for i, o in enumerate(origins) if o in kept], merges)

    monkeypatch.setattr(compression_module, "plan", replay)
    return used


def engine_continuation(ids: List[int], settings: dict, steps: int) -> List[int]:
    """The embedded engine's greedy ``steps``-token continuation of ``ids`` with compression
    ``settings`` (its integrity checked)."""
    import rksc_sgl

    engine = rksc_sgl.Engine(model="smollm2-135m", cache="radix", num_threads=1, device="cpu", kv_pool_tokens=1024,
                             max_running_requests=2, compression=settings)
    try:
        got = engine.generate_request(input_ids=ids, sampling_params={"max_new_tokens": steps, "temperature": 0,
                                                                      "ignore_eos": True})
        engine.check_integrity()
    finally:
        engine.shutdown()
    return got["output_ids"]


@torch.no_grad()
def transformers_with_entries_deleted(model, ids: List[int], events: List[dict], steps: int,
                                      config) -> Tuple[List[int], int]:
    """``transformers``' greedy ``steps``-token decode of ``ids`` that deletes from its cache,
    at each compaction of ``events`` (``config``'s rule says when), the entries the runtime
    dropped, each token at its true position; returns the tokens and the events replayed."""
    from transformers import DynamicCache

    prompt, buffer = len(ids), config.buffer
    cache = DynamicCache()
    logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=True).logits[0, -1]
    positions = list(range(prompt))  # original position of each cache entry
    tokens, k = [], 0
    for step in range(steps):
        token = int(logits.argmax())
        tokens.append(token)
        if step == steps - 1:
            break
        length = cache.get_seq_length()
        logits = model(torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                       position_ids=torch.tensor([[prompt + step]]), cache_position=torch.tensor([length])).logits[0, -1]
        positions.append(prompt + step)
        held = len(positions) - prompt
        if config.needs_compression(held, step + 1):
            assert events[k]["decoded"] == step + 1
            kept = set(events[k]["kept"])
            candidates = positions[prompt:len(positions) - buffer]
            assert candidates == candidate_origins(events, k, prompt, buffer)
            index = list(range(prompt)) + [prompt + i for i, o in enumerate(candidates) if o in kept] + \
                list(range(len(positions) - buffer, len(positions)))
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
            positions = [positions[i] for i in index]
            k += 1
    return tokens, k
