"""update.rank_share: each rank's rows of a minibatch and the weight of its loss, such that the mean
over ranks of weight x (mean loss over the rank's rows) is the mean over all rows."""

from __future__ import annotations

import pytest
import torch

from services.trainer.distributed import Distributed
from services.trainer.update import rank_share


@pytest.mark.parametrize("rows,world", [(8, 2), (3, 2), (3, 4), (1, 4), (5, 3)])
def test_the_mean_of_weighted_rank_means_is_the_minibatch_mean(rows, world):
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(rows * world))
    losses = torch.arange(rows, dtype=torch.float64) ** 2 + 1.0  # a per-row loss, indexed by row id
    seen, weighted = [], []
    for rank in range(world):
        share, weight = rank_share(order, Distributed(rank=rank, world_size=world))
        mine = order[rank::world]
        if len(mine):
            assert torch.equal(share, mine) and weight == len(mine) * world / rows
            seen += mine.tolist()
        else:  # an empty share: one row, weighted 0, so the rank still joins the reduction
            assert len(share) == 1 and weight == 0.0
        weighted.append(weight * float(losses[share].mean()))
    assert sorted(seen) == sorted(order.tolist())
    assert sum(weighted) / world == pytest.approx(float(losses.mean()))


def test_one_process_takes_every_row_at_weight_1():
    order = torch.tensor([2, 0, 1])
    share, weight = rank_share(order, None)
    assert torch.equal(share, order) and weight == 1.0
