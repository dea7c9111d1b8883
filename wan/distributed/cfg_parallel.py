"""CFG parallelism: the conditional and unconditional passes on different ranks.

With `--cfg_parallel` the world is cfg_size (2) x ulysses_size ranks. Rank layout (ulysses
groups are contiguous, so they stay inside a node's NVLink domain):

    rank = cfg_index * ulysses_size + sp_index
    SP (Ulysses) group c:  ranks [c*U, ..., c*U + U - 1]           (c = 0: cond, 1: uncond)
    CFG group j:           ranks [j, U + j]                        (one rank per CFG branch)

Each step, the ranks of CFG branch 0 run the conditional forward and those of branch 1 the
unconditional one (each branch Ulysses-parallel inside its SP group when U > 1); one
all_gather inside the CFG group then hands both predictions to every rank, which combines
them as u + s * (c - u) in fp32 -- the same expression, on the same values, as the sequential
reference, so every rank computes an identical latent update.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ['ParallelInfo', 'parallel_layout', 'data_parallel_layout', 'make_groups',
           'replica_group', 'cfg_parallel_predict']


@dataclass(frozen=True)
class ParallelInfo:
    rank: int
    world_size: int
    ulysses_size: int
    cfg_size: int          # 2 with CFG parallelism, else 1
    cfg_rank: int          # 0: conditional branch, 1: unconditional branch
    sp_rank: int           # rank inside the Ulysses group
    sp_ranks: Tuple[int, ...]
    cfg_ranks: Tuple[int, ...]
    data_parallel: int = 1  # replicas of the pipeline, each generating its own videos
    replica: int = 0        # which replica this rank belongs to
    replica_ranks: Tuple[int, ...] = ()  # the ranks of this rank's replica (global ranks)

    @property
    def replica_rank(self) -> int:
        """This rank's index inside its replica (0 decodes and writes that replica's
        videos)."""
        return self.replica_ranks.index(self.rank) if self.replica_ranks else self.rank


def parallel_layout(world_size: int, ulysses_size: Optional[int],
                    cfg_parallel: bool) -> Tuple[int, int]:
    """(cfg_size, ulysses_size) for this world: the one rule of the parallel layout, used by
    the CLIs' checks, the pipelines and the benchmark. ValueError when it does not hold.

    world = cfg_size (2 with CFG parallelism, else 1) x ulysses_size, except that without
    CFG parallelism an ulysses_size of 1 lets every rank compute the whole video (FSDP-only
    runs). `ulysses_size=None` means the whole world (halved with CFG parallelism). Pure
    arithmetic, no collective: it fails identically on every rank.
    """
    cfg_size = 2 if cfg_parallel else 1
    if cfg_parallel and world_size < 2:
        raise ValueError('CFG parallelism needs a distributed launch with 2 x ulysses_size '
                         'processes (e.g. torchrun --nproc_per_node=2 ... --cfg_parallel)')
    if ulysses_size is None:
        if world_size % cfg_size:
            raise ValueError(f'CFG parallelism needs an even world size, got {world_size}')
        ulysses_size = world_size // cfg_size
    if ulysses_size < 1:
        raise ValueError(f'ulysses_size must be >= 1, got {ulysses_size}')
    if cfg_parallel and ulysses_size * cfg_size != world_size:
        raise ValueError(f'CFG parallelism with ulysses_size {ulysses_size} needs world size '
                         f'{2 * ulysses_size}, got {world_size}')
    if not cfg_parallel and ulysses_size > 1 and ulysses_size != world_size:
        raise ValueError(f'ulysses_size {ulysses_size} must equal the world size {world_size}')
    return cfg_size, ulysses_size


def data_parallel_layout(world_size: int, ulysses_size: int, cfg_parallel: bool) -> int:
    """Replicas of a cfg x ulysses pipeline in this world (data parallelism over prompts):
    world = replicas x cfg_size x ulysses_size; ValueError when it does not divide."""
    cfg_size = 2 if cfg_parallel else 1
    if ulysses_size < 1:
        raise ValueError(f'ulysses_size must be >= 1, got {ulysses_size}')
    per_replica = cfg_size * ulysses_size
    if world_size % per_replica:
        raise ValueError(f'world size {world_size} is not a multiple of ulysses_size '
                         f'{ulysses_size} x {cfg_size} ({"with" if cfg_parallel else "without"}'
                         f' CFG parallelism): no whole number of pipeline replicas')
    return world_size // per_replica


def make_groups(world_size: int, ulysses_size: Optional[int], cfg_parallel: bool,
                data_parallel: int = 1):
    """Build the process groups; returns (sp_group, cfg_group, ParallelInfo).

    Every rank must call this with the same arguments (dist.new_group is collective over the
    world). With `data_parallel` replicas the world holds that many copies of the pipeline,
    each on a contiguous block of cfg_size x ulysses_size ranks, and every group below lies
    inside one replica (`ParallelInfo.replica_ranks`). With one replica and no CFG
    parallelism the SP group is the whole world (None, as the reference) and cfg_group is
    None.
    """
    per_replica = world_size // data_parallel
    if data_parallel < 1 or per_replica * data_parallel != world_size:
        raise ValueError(f'data_parallel {data_parallel} must divide the world size '
                         f'{world_size}')
    cfg_size, u = parallel_layout(per_replica, ulysses_size, cfg_parallel)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized() and dist.get_world_size() != world_size:
        raise ValueError(f'world_size {world_size} differs from the process group\'s '
                         f'{dist.get_world_size()}')
    replica, local = divmod(rank, per_replica)
    base = replica * per_replica
    all_sp = [tuple(b + c * u + i for i in range(u)) for b in range(0, world_size, per_replica)
              for c in range(cfg_size)]
    all_cfg = [tuple(b + j + c * u for c in range(cfg_size))
               for b in range(0, world_size, per_replica) for j in range(u)]
    sp_ranks = next(r for r in all_sp if rank in r)
    cfg_ranks = next(r for r in all_cfg if rank in r)
    info = ParallelInfo(rank=rank, world_size=world_size, ulysses_size=u, cfg_size=cfg_size,
                        cfg_rank=local // u, sp_rank=local % u, sp_ranks=sp_ranks,
                        cfg_ranks=cfg_ranks, data_parallel=data_parallel, replica=replica,
                        replica_ranks=tuple(range(base, base + per_replica)))
    if not cfg_parallel and data_parallel == 1:
        return None, None, info
    sp_group = cfg_group = None
    # same creation order on every rank
    for ranks in all_sp:
        g = dist.new_group(list(ranks))
        if rank in ranks:
            sp_group = g
    if cfg_parallel:
        for ranks in all_cfg:
            g = dist.new_group(list(ranks))
            if rank in ranks:
                cfg_group = g
    return sp_group, cfg_group, info


def replica_group(info: ParallelInfo):
    """The process group of this rank's pipeline replica (None: the whole world), for the
    pipeline's own collectives (seed agreement, barriers, FSDP). Collective: every rank
    calls it in the same order."""
    if info is None or info.data_parallel == 1:
        return None
    group = None
    per = info.world_size // info.data_parallel
    for start in range(0, info.world_size, per):
        ranks = list(range(start, start + per))
        g = dist.new_group(ranks)
        if info.rank in ranks:
            group = g
    return group


def cfg_parallel_predict(model, latents: torch.Tensor, t: torch.Tensor,
                         context: torch.Tensor, context_null: torch.Tensor, seq_len: int,
                         guide_scale: float, cfg_group) -> torch.Tensor:
    """One CFG prediction with the two passes on the two ranks of `cfg_group`.

    Group rank 0 runs the conditional pass, group rank 1 the unconditional one; the two
    predictions are all_gathered, and every rank returns uncond + s * (cond - uncond).
    """
    if dist.get_world_size(cfg_group) != 2:
        raise ValueError('the CFG group must hold exactly 2 ranks')
    branch = dist.get_rank(cfg_group)
    ctx = context if branch == 0 else context_null
    pred = model([latents], t=torch.stack([t]), context=[ctx], seq_len=seq_len)[0]
    pred = pred.contiguous()
    both = [torch.empty_like(pred) for _ in range(2)]
    dist.all_gather(both, pred, group=cfg_group)
    cond, uncond = both
    return uncond + guide_scale * (cond - uncond)
