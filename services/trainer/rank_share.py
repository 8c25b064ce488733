"""Each rank's share of a minibatch under data parallelism (ddp or fsdp), and the weights that make
the ranks' update and its figures those of one rank on the whole minibatch, whatever the lengths.

DDP and FSDP2 reduce gradients as the mean over ranks, so a rank's loss term counts weight·term with

    a mean over the share's response tokens:  weight = tokens_r · world / tokens   (token_mean loss,
                                                        the value loss, approx_kl, entropy, clip fraction)
    a mean over the share's sequences:        weight = rows_r · world / rows       (sequence_mean loss)

and the mean over ranks of weight_r · term_r is the term over the whole minibatch. A figure the
update reports (loss, approx_kl, ...) is reduced the same way, in one all-reduce after the step, so
every rank reports, and decides early stopping on, what one rank would have."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .distributed import Distributed


@dataclass(frozen=True)
class Share:
    rows: torch.Tensor  # this rank's rows of the minibatch (indices into the batch)
    per_sequence: float  # the weight of a mean over the share's sequences
    per_token: float  # the weight of a mean over the share's response tokens

    def weight(self, aggregation: str) -> float:
        """The weight of a loss aggregated as trainer.loss_aggregation says."""
        return self.per_token if aggregation == "token_mean" else self.per_sequence


def rank_share(rows: torch.Tensor, distributed: Distributed | None, tokens_per_row: torch.Tensor) -> Share:
    """This rank's rows of a minibatch (rows[rank::world]) and their weights; `tokens_per_row` (B,):
    the response tokens of every row of the batch. A rank with no rows (a minibatch smaller than the
    world) still joins the forward and the reduction, on one row weighted 0."""
    if distributed is None:
        return Share(rows, 1.0, 1.0)
    world = distributed.world_size
    mine = rows[distributed.rank :: world]
    if len(mine) == 0:
        return Share(rows[:1], 0.0, 0.0)
    tokens = float(tokens_per_row[rows].sum())
    per_token = float(tokens_per_row[mine].sum()) * world / tokens if tokens else 0.0
    return Share(mine, len(mine) * world / len(rows), per_token)


def reduced_figures(
    values: dict[str, float], weights: dict[str, float], distributed: Distributed | None
) -> dict[str, float]:
    """The minibatch's figures as one rank on the whole of it has them: the sum over ranks of
    weight·value, over world (one all-reduce). One process: the values themselves."""
    if distributed is None:
        return values
    names = list(values)
    sums = distributed.sum_each([values[name] * weights[name] for name in names])
    return {name: total / distributed.world_size for name, total in zip(names, sums)}


def record_figures(
    figures: dict, distributed, loss: torch.Tensor, info: dict, entropy: torch.Tensor, share: Share
) -> None:
    """A stepped minibatch's figures, the whole minibatch's on every rank (rank_share.reduced_figures):
    the loss already carries its share's weight; the token means (approx_kl, clip fraction, entropy,
    the value loss) get the share's token weight."""
    values = {"loss": loss.item(), "approx_kl": info["approx_kl"].item()}
    values |= {"clip_fraction": info["clip_fraction"].item(), "entropy": entropy.item()}
    if "value_loss" in info:
        values["value_loss"] = info["value_loss"].item()
    weights = {name: 1.0 if name == "loss" else share.per_token for name in values}
    for name, value in reduced_figures(values, weights, distributed).items():
        figures[name].append(value)
