"""A few calls of SGLang's native HTTP API, with bounded waits (tests and ``bench --backend runtime``).

The URL is one SGLang server or SGLang's router (``sglang-router``) in front of several:

- A server with ``--dp-size N`` runs N schedulers, each with its own tree: its
  ``/server_info`` lists their ``internal_states`` in DP-rank order, each with its ``rksc``
  entry (:mod:`rksc_sgl.runtime.server_state`).
- The router (0.3.2) proxies ``/generate`` (``rid`` and ``sampling_params.sampling_seed``
  intact) and ``/get_model_info``, and sends ``/flush_cache`` to every worker; it has no
  ``/server_info`` (404; its ``/get_server_info`` describes the router) and no
  ``/abort_request`` (404). For those, :class:`RuntimeClient` goes to the servers behind it:
  the URLs it was given (``worker_urls``) or, when none, those the router lists at ``/workers``
  (which must then be reachable from here under the names the router uses).

So :meth:`RuntimeClient.scheduler_states` and :meth:`RuntimeClient.idle_integrity` cover every
scheduler of every server, and :meth:`RuntimeClient.abort` through a router is sent to every
server: a request id (``rid``) names at most one request across them, and a server that does
not hold it ignores it.
"""

from __future__ import annotations

import re
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import requests

DEFAULT_TIMEOUT_S = 300.0

_DP_RANK_SUFFIX = re.compile(r"@\d+$")  # a dp-aware router lists a server's ranks as URL@rank


class RuntimeClient:
    """SGLang's ``/generate``, ``/server_info``, ``/flush_cache`` and ``/abort_request`` at ``url``
    (a server, or a router: see the module doc). ``worker_urls``: the servers behind a router
    (``url`` is then taken to be one), for when the names the router lists are not reachable
    from here."""

    def __init__(self, url: str, timeout: float = DEFAULT_TIMEOUT_S, worker_urls: Optional[Sequence[str]] = None):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self._worker_urls = [u.rstrip("/") for u in worker_urls] if worker_urls else None
        self._router: Optional[bool] = True if worker_urls else None

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

    # -- a server or a router -------------------------------------------------------------
    def is_router(self) -> bool:
        """Whether ``url`` is a router (no ``/server_info``, a ``/workers`` list); asked once."""
        if self._router is None:
            response = requests.get(self.url + "/server_info", timeout=self.timeout)
            if response.status_code == 404:
                workers = requests.get(self.url + "/workers", timeout=self.timeout)
                if workers.status_code != 200 or not isinstance(_json(workers).get("workers"), list):
                    response.raise_for_status()  # neither: SGLang's 404 names the route
                self._router = True
            else:
                response.raise_for_status()
                self._router = False
        return self._router

    def router_workers(self) -> List[str]:
        """The server URLs the router lists now (healthy or not), each once."""
        response = requests.get(self.url + "/workers", timeout=self.timeout)
        response.raise_for_status()
        urls: List[str] = []
        for worker in response.json()["workers"]:
            url = _DP_RANK_SUFFIX.sub("", str(worker["url"]).rstrip("/"))
            if url not in urls:
                urls.append(url)
        return urls

    def servers(self) -> List["RuntimeClient"]:
        """A client for each SGLang server answering for ``url``: this one, or the router's."""
        if not self.is_router():
            return [self]
        urls = self._worker_urls if self._worker_urls is not None else self.router_workers()
        servers = []
        for url in urls:
            server = RuntimeClient(url, timeout=self.timeout)
            server._router = False
            servers.append(server)
        return servers

    # -- state ----------------------------------------------------------------------------
    def server_info(self) -> Dict[str, Any]:
        """This server's ``/server_info`` (a router has none: see :meth:`server_infos`)."""
        response = requests.get(self.url + "/server_info", timeout=self.timeout)
        response.raise_for_status()
        return response.json()

    def server_infos(self) -> List[Tuple[str, Dict[str, Any]]]:
        """``(url, /server_info)`` of every server answering for ``url``."""
        return [(server.url, server.server_info()) for server in self.servers()]

    def scheduler_states(self) -> List[Dict[str, Any]]:
        """Every scheduler's internal state (SGLang's, plus ``rksc`` with the RKSC backend): each
        server's DP ranks in order, servers in the router's order."""
        return [state for _, info in self.server_infos() for state in info["internal_states"]]

    def scheduler_state(self) -> Dict[str, Any]:
        """The first scheduler's internal state (the settings every rank of a server shares)."""
        return self.scheduler_states()[0]

    def rksc_states(self) -> List[Optional[Dict[str, Any]]]:
        """Every scheduler's ``rksc`` entry (``None`` where the tree is not RKSC's)."""
        return [state.get("rksc") for state in self.scheduler_states()]

    def rksc_state(self) -> Optional[Dict[str, Any]]:
        """The first scheduler's ``rksc`` entry (see :meth:`rksc_states` for all of them)."""
        return self.rksc_states()[0]

    # -- actions --------------------------------------------------------------------------
    def flush_cache(self) -> None:
        """Empty every tree (SGLang refuses while requests run: ``HTTPError``). Through a router,
        each server is asked itself, so a refusal is not lost in the router's summary."""
        for server in self.servers():
            response = requests.post(server.url + "/flush_cache", timeout=self.timeout)
            response.raise_for_status()

    def abort(self, rid: str = "", abort_all: bool = False) -> None:
        """SGLang's ``/abort_request``; through a router, sent to every server (the one holding
        ``rid`` ends it, the others ignore it). Raises only if no server took it."""
        errors = []
        servers = self.servers()
        for server in servers:
            try:
                response = requests.post(server.url + "/abort_request", json={"rid": rid, "abort_all": abort_all},
                                         timeout=self.timeout)
                response.raise_for_status()
            except requests.RequestException as exc:
                errors.append(exc)
        if len(errors) == len(servers):
            raise errors[0] if errors else RuntimeError(f"{self.url}: no server to send the abort to")

    def healthy(self) -> bool:
        """``/health`` answers 200 here and, through a router, at every server behind it."""
        try:
            if requests.get(self.url + "/health", timeout=10).status_code != 200:
                return False
            return not self.is_router() or all(server.healthy() for server in self.servers())
        except requests.RequestException:
            return False

    def idle_integrity(self, wait_s: float = 30.0) -> Dict[str, Any]:
        """The ``rksc`` trees' integrity once every scheduler is idle (bounded wait), as one
        report: ``checked`` (every scheduler checked), ``ok`` (``False`` if any check failed,
        ``None`` while some are unchecked), ``problems`` (prefixed with the scheduler's place when
        there are several), ``slots`` (summed) and ``schedulers`` (each one's own report)."""
        deadline = time.monotonic() + wait_s
        while True:
            places = []
            for url, info in self.server_infos():
                for rank, state in enumerate(info["internal_states"]):
                    report = (state.get("rksc") or {}).get("integrity")
                    if report is None:
                        raise RuntimeError(f"{url} DP rank {rank}: the tree cache is not rksc's: no integrity report")
                    places.append({"url": url, "dp_rank": rank, **report})
            checked = all(p["checked"] for p in places)
            if checked or time.monotonic() > deadline:
                return _combined(places)
            time.sleep(0.2)


def _json(response) -> Dict[str, Any]:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _combined(places: List[Dict[str, Any]]) -> Dict[str, Any]:
    several = len(places) > 1
    problems = [f"[{p['url']} DP rank {p['dp_rank']}] {problem}" if several else problem
                for p in places for problem in p["problems"]]
    failed = any(p["checked"] and not p["ok"] for p in places)
    checked = all(p["checked"] for p in places)
    slots: Dict[str, int] = {}
    for p in places:
        for key, value in (p.get("slots") or {}).items():
            slots[key] = slots.get(key, 0) + value
    return {"checked": checked, "ok": False if failed else (True if checked else None), "problems": problems,
            "slots": slots, "schedulers": places}
