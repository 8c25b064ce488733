"""rank_share: each rank's rows of a minibatch and the weights of its loss terms, such that the mean
over ranks of weight x (the term over the rank's rows) is the term over the whole minibatch: per
sequence for a mean over sequences, per response token for a mean over tokens, whatever the lengths."""

from __future__ import annotations

import pytest
import torch

from services.trainer.distributed import Distributed
from services.trainer.rank_share import rank_share, reduced_figures


@pytest.mark.parametrize("rows,world", [(8, 2), (3, 2), (3, 4), (1, 4), (5, 3)])
def test_the_mean_of_weighted_rank_means_is_the_minibatch_mean(rows, world):
    generator = torch.Generator().manual_seed(rows * world)
    batch = rows + 4  # the minibatch is some of the batch's rows
    order = torch.randperm(batch, generator=generator)[:rows]
    tokens = torch.randint(1, 9, (batch,), generator=generator)  # response tokens of each row: unequal
    token_losses = [torch.rand(int(n), generator=generator, dtype=torch.float64) for n in tokens]
    row_means = torch.stack([losses.mean() for losses in token_losses])
    # The minibatch's own figures, written out: over its tokens, and over its sequences.
    whole_token_mean = torch.cat([token_losses[r] for r in order.tolist()]).mean()
    whole_sequence_mean = row_means[order].mean()
    seen, by_token, by_sequence = [], [], []
    for rank in range(world):
        share = rank_share(order, Distributed(rank=rank, world_size=world), tokens)
        mine = order[rank::world]
        if len(mine):
            assert torch.equal(share.rows, mine)
            seen += mine.tolist()
        else:  # an empty share: one row, weighted 0, so the rank still joins the reduction
            assert len(share.rows) == 1 and share.per_token == 0.0 and share.per_sequence == 0.0
        token_mean = torch.cat([token_losses[r] for r in share.rows.tolist()]).mean()
        by_token.append(share.weight("token_mean") * float(token_mean))
        by_sequence.append(share.weight("sequence_mean") * float(row_means[share.rows].mean()))
    assert sorted(seen) == sorted(order.tolist())
    assert sum(by_token) / world == pytest.approx(float(whole_token_mean))
    assert sum(by_sequence) / world == pytest.approx(float(whole_sequence_mean))


def test_one_process_takes_every_row_at_weight_1_and_its_figures_as_they_are():
    order = torch.tensor([2, 0, 1])
    share = rank_share(order, None, torch.tensor([3, 1, 4]))
    assert torch.equal(share.rows, order) and share.per_token == 1.0 and share.per_sequence == 1.0
    figures = {"loss": 0.25, "approx_kl": 0.5}
    assert reduced_figures(figures, {"loss": 7.0, "approx_kl": 3.0}, None) == figures
