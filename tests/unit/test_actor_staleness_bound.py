"""The actor's bound on how far ahead it samples: a batch is generated only if its last row would
be trained within max_staleness versions of the weights that sample it."""

from __future__ import annotations

import pytest

from services.policy.actor import may_generate


@pytest.mark.parametrize(
    "trainer_version, outstanding, policy_version, max_staleness, expected",
    [
        (0, 0, 0, 0, True),  # overlap off: nothing in flight, same version
        (0, 8, 0, 0, False),  # overlap off: the trainer still holds a batch
        (1, 0, 0, 0, False),  # the actor has not swapped to the published version yet
        (0, 8, 0, 1, True),  # overlap on: sample batch k+1 while the trainer updates on batch k
        (0, 16, 0, 1, False),  # overlap on: two batches ahead would be stale by 2
        (3, 4, 2, 1, False),  # half a batch waiting: our last row lands in the next trainer batch (3+1-2 = 2)
        (3, 0, 2, 1, True),
    ],
)
def test_a_batch_is_sampled_only_if_it_will_not_be_stale(
    trainer_version, outstanding, policy_version, max_staleness, expected
):
    rows, batch_size = 8, 8
    # Independently: the trainer takes `outstanding` rollouts first, one version per full batch of
    # batch_size; our rows follow; the last one is trained at the version reached when it is taken.
    last_row_index = outstanding + rows - 1
    trained_at = trainer_version + last_row_index // batch_size
    assert (trained_at - policy_version <= max_staleness) == expected
    assert may_generate(trainer_version, outstanding, policy_version, rows, batch_size, max_staleness) is expected
