"""Tensor-parallel ranks in tests: one spawned process per rank, joined in a gloo group."""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Dict

from processes import alive

RESULT_TIMEOUT_S = 240


def _rank_main(work: Callable[[int, int], Any], rank: int, world: int, port: int, out) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        out.put((rank, work(rank, world)))
    except BaseException as exc:
        out.put((rank, repr(exc)))
        raise
    finally:
        dist.destroy_process_group()


def on_ranks(work: Callable[[int, int], Any], world: int) -> Dict[int, Any]:
    """``{rank: work(rank, world)}``, each call in its own spawned process of one gloo group
    (``work`` a module-level function; ``torch.distributed``'s default group is the ranks').
    A rank that raises fails the caller with every rank's error; every process is ended and
    checked gone."""
    from rksc_sgl.runtime.server_process import free_port

    context = multiprocessing.get_context("spawn")
    out = context.Queue()
    port = free_port()
    procs = [context.Process(target=_rank_main, args=(work, rank, world, port, out)) for rank in range(world)]
    for p in procs:
        p.start()
    try:
        results = dict(out.get(timeout=RESULT_TIMEOUT_S) for _ in procs)
        errors = {rank: r for rank, r in results.items() if isinstance(r, str)}
        assert not errors, errors
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert not alive({p.pid for p in procs})
    return results
