"""A request aborted mid-decode, whatever the machine's load: it is streamed, and aborted
through SGLang's ``/abort_request`` once it has decoded a given number of tokens (a fixed
sleep before the abort can land before the request is scheduled on a loaded machine, or after
it has finished on a fast one)."""

from __future__ import annotations

import json

import requests

LONG = 400
"""The streamed request's ``max_new_tokens``: far more than it decodes before the abort."""


def stream_then_abort(client, prompt_ids: list, rid: str, before_abort: int = 4,
                      sampling_params: dict = None, timeout: float = 120) -> dict:
    """Stream ``prompt_ids`` (greedy, ``LONG`` tokens, EOS ignored unless ``sampling_params``
    says otherwise) as ``rid`` on ``client``'s server and abort it once ``before_abort`` tokens
    are out; the last streamed record (``output_ids``, ``meta_info``), checked to end aborted
    with at least ``before_abort`` and fewer than ``LONG`` tokens."""
    params = {"max_new_tokens": LONG, "temperature": 0, "ignore_eos": True, **(sampling_params or {})}
    body = {"input_ids": prompt_ids, "rid": rid, "sampling_params": params, "stream": True}
    last, aborted = None, False
    with requests.post(client.url + "/generate", json=body, stream=True, timeout=timeout) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            last = json.loads(line[5:])
            if not aborted and len(last["output_ids"]) >= before_abort:
                client.abort(rid=rid)
                aborted = True
    assert last is not None and last["meta_info"]["finish_reason"]["type"] == "abort", last
    assert before_abort <= len(last["output_ids"]) < params["max_new_tokens"], last["meta_info"]
    return last
