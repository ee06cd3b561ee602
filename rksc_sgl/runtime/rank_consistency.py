"""Identical RSBCM decisions on every tensor-parallel rank.

Each rank of a tensor-parallel server runs its own scheduler and tree, and SGLang relies on
all of them making the same tree decisions. RSBCM's inputs that could differ between ranks,
and how they are made equal:

* attention mass: each rank's ``rksc_attention`` hook sees only its own heads. At every
  eviction the candidates' mass sums are gathered from every rank of the group and averaged
  in rank order, so every rank ranks with the same numbers (bit for bit: the same values
  added in the same order), the mean over all heads;
* recency: wall-clock ages differ between processes; on more than one rank RSBCM counts
  recency on the tree's operation clock (``RSBCMStrategy.use_ranks``);
* ties: broken by ``TreeNode.id``, which ranks running the same tree operations assign alike.

Before the sums, the ranks compare the candidates' ids: ranks that hold different trees
have already diverged, and the scheduler stops with that message instead of evicting
different KV on each rank.

Decode-KV compression averages its candidates' mass and key similarities the same way
(:func:`mean_over_ranks`). :func:`rank_log` opens the per-rank decision logs that tests
compare across ranks.
"""

from __future__ import annotations

from typing import Callable, List, Optional, TextIO

import torch

__all__ = ["RankDivergence", "gather_mean", "mean_over_ranks", "rank_log", "rank_reducer"]


class RankDivergence(RuntimeError):
    """Tensor-parallel ranks hold different trees."""


def _fingerprint(ids: List[int]) -> torch.Tensor:
    digest = 0
    for node_id in ids:
        digest = (digest * 1000003 + node_id + 1) % (1 << 61)
    return torch.tensor([len(ids), digest], dtype=torch.int64)


def gather_mean(tensors: List[torch.Tensor]) -> torch.Tensor:
    """The mean of the ranks' tensors, added in rank order (the same bits on every rank)."""
    total = tensors[0].clone()
    for other in tensors[1:]:
        total += other
    return total / len(tensors)


def mean_over_ranks(group, world_size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A tensor's mean over the ``world_size`` ranks of ``group``, the same bits on every rank
    (gathered, then added in rank order): one ``all_gather`` on the tensor's device (a gloo
    group for CPU tensors, NCCL for CUDA ones), nothing read back to the host. Every rank
    must call it with a tensor of the same shape, in the same order."""
    import torch.distributed as dist

    def mean(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.contiguous()
        gathered = [torch.empty_like(tensor) for _ in range(world_size)]
        dist.all_gather(gathered, tensor, group=group)
        return gather_mean(gathered)

    return mean


def rank_reducer(group, world_size: int) -> Callable[[torch.Tensor, List[int]], torch.Tensor]:
    """``RSBCMStrategy.use_ranks``'s reducer over the CPU process ``group`` (SGLang's
    ``tp_cache_group``, gloo) of ``world_size`` ranks: two small collectives per eviction."""
    import torch.distributed as dist

    mean = mean_over_ranks(group, world_size)

    def reduce(sums: torch.Tensor, ids: List[int]) -> torch.Tensor:
        mine = _fingerprint(ids)
        prints = [torch.empty_like(mine) for _ in range(world_size)]
        dist.all_gather(prints, mine, group=group)
        if any(not torch.equal(p, prints[0]) for p in prints):
            raise RankDivergence(
                "rsbcm: tensor-parallel ranks hold different radix trees at an eviction "
                f"(candidate nodes per rank: {[int(p[0]) for p in prints]}); the ranks' schedulers "
                "have diverged. Report this with the server log; --radix-eviction-policy lru avoids RSBCM")
        return mean(sums.to(torch.float32))

    return reduce


def rank_log(variable: str, stem: str, tp_rank: int) -> Optional[TextIO]:
    """``<folder>/<stem>.tp<rank>.pid<pid>.log``, opened to append line by line, where the
    environment ``variable`` names a folder (None when it is unset): one scheduler's decisions,
    for tests that compare tensor-parallel ranks."""
    import logging
    import os

    folder = os.environ.get(variable, "").strip()
    if not folder:
        return None
    path = os.path.join(folder, f"{stem}.tp{tp_rank}.pid{os.getpid()}.log")
    logging.getLogger(__name__).info("rksc: %s logged to %s", stem, path)
    return open(path, "a", buffering=1)
