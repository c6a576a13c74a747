"""The communication steps of context parallelism, as autograd functions over the cp group."""

from __future__ import annotations

import torch
import torch.distributed as dist


class AllGatherChunkTails(torch.autograd.Function):
    """Every rank's (2, B, ...) rows of its two chunks -> (2cp, B, ...) rows in chunk order.

    Backward: each rank's rows were read by any rank, so the gradient is summed over the group
    (an all-reduce: gloo has no reduce-scatter, and these are a few rows) and each rank keeps its own.
    """

    @staticmethod
    def forward(ctx, own_rows: torch.Tensor, group) -> torch.Tensor:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        ctx.group, ctx.rank, ctx.size = group, rank, size
        gathered = [torch.empty_like(own_rows) for _ in range(size)]
        dist.all_gather(gathered, own_rows.contiguous(), group=group)
        by_rank = torch.stack(gathered)  # (cp, 2, B, ...)
        return torch.cat([by_rank[:, 0], by_rank[:, 1].flip(0)])  # chunks 0..cp-1, then cp..2cp-1

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return torch.stack([grad[ctx.rank], grad[2 * ctx.size - 1 - ctx.rank]]), None


def start_ring_shift(tensor: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Send ``tensor`` to the next rank of the ring and receive the previous rank's into a new buffer."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    received = torch.empty_like(tensor)
    ops = [
        dist.P2POp(dist.isend, tensor, dist.get_global_rank(group, (rank + 1) % size), group),
        dist.P2POp(dist.irecv, received, dist.get_global_rank(group, (rank - 1) % size), group),
    ]
    return received, dist.batch_isend_irecv(ops)


def finish(requests: list) -> None:
    for request in requests:
        request.wait()
