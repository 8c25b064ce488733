"""The bench's record of one measured step, the same in every mode: the services mode makes it from
the trainer's step record (services/common/step_records.py), the in-process mode from its own clock.
figures.py reads it by attribute; the raw run keeps it as a JSON object of these fields (the in-process
mode's run crosses a process boundary as JSON)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

# The bench's stages, in the order its report lists them. publish and persist are the trainer's
# critical-path parts (persist: the snapshot's copy plus any wait for the previous persist; 0 on steps
# where none was due); the background write of a persist is off the critical path and not a stage.
STAGES = (
    "generation",
    "behaviour_logprobs",
    "reference",
    "reward",
    "queue",
    "update",
    "publish",
    "persist",
    "hot_swap",
)


@dataclass
class BenchStep:
    version: int  # the version the step's update made
    end_time: float  # Unix time the step ended
    rollouts: int
    response_tokens: int
    rollout_versions: list[int]  # the versions that sampled the batch
    optimizer_steps: int
    publish_bytes: int  # 0 in one process: nothing is handed off
    persisted_version: int  # newest version in a committed checkpoint at the step's end
    persist_background_seconds: float  # the last background persist write committed by then
    seconds: dict[str, float]  # seconds of each of STAGES

    def __post_init__(self) -> None:
        if set(self.seconds) != set(STAGES):
            raise ValueError(f"bench step {self.version}: seconds has stages {sorted(self.seconds)}, expected {STAGES}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BenchStep:
        return cls(**data)
