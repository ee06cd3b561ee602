"""A few calls of SGLang's native HTTP API, with bounded waits (tests and ``bench --backend runtime``)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Union

import requests

DEFAULT_TIMEOUT_S = 300.0


class RuntimeClient:
    """SGLang's ``/generate``, ``/server_info``, ``/flush_cache`` and ``/abort_request`` at ``url``."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S):
        self.url = url.rstrip("/")
        self.timeout = timeout

    def generate(self, text: Union[str, List[str], None] = None, *, input_ids=None,
                 sampling_params: Optional[Dict[str, Any]] = None, **fields: Any):
        body = {"sampling_params": sampling_params or {}, **fields}
        if text is not None:
            body["text"] = text
        if input_ids is not None:
            body["input_ids"] = input_ids
        response = requests.post(self.url + "/generate", json=body, timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def server_info(self) -> Dict[str, Any]:
        response = requests.get(self.url + "/server_info", timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def scheduler_state(self) -> Dict[str, Any]:
        """The first scheduler's internal state (SGLang's, plus ``rksc`` with the RKSC backend)."""
        return self.server_info()["internal_states"][0]

    def rksc_state(self) -> Optional[Dict[str, Any]]:
        return self.scheduler_state().get("rksc")

    def flush_cache(self) -> None:
        response = requests.post(self.url + "/flush_cache", timeout=self.timeout)
        response.raise_for_status()

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        response = requests.post(self.url + "/abort_request", json={"rid": rid, "abort_all": abort_all},
                                 timeout=self.timeout)
        response.raise_for_status()

    def healthy(self) -> bool:
        try:
            return requests.get(self.url + "/health", timeout=10).status_code == 200
        except requests.RequestException:
            return False

    def idle_integrity(self, wait_s: float = 30.0) -> Dict[str, Any]:
        """The ``rksc`` tree's integrity report once the scheduler is idle (bounded wait)."""
        deadline = time.monotonic() + wait_s
        while True:
            report = (self.rksc_state() or {}).get("integrity")
            if report is None:
                raise RuntimeError("the server's tree cache is not rksc's: no integrity report")
            if report["checked"] or time.monotonic() > deadline:
                return report
            time.sleep(0.2)
