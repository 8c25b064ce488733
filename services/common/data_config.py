"""The `data` section of Belay's config (config.py): where the actor's prompts come from, a dataset
read with the `datasets` library or (path empty) the one-prompt-per-line policy.prompts_file. Read by
services/common/prompt_data.py; docs/datasets.md describes each field with examples."""

from __future__ import annotations

from pydantic import Field, model_validator

from .config_section import Section


class DataConfig(Section):
    path: str | None = Field(
        None,
        description="local dataset: a .jsonl/.json, .parquet, .csv or .arrow file, or a directory written by "
        "datasets' save_to_disk (a DatasetDict's 'train' split, or its only one); None: policy.prompts_file",
    )
    prompt_column: str = Field("prompt", description="column holding each row's prompt text (the user message)")
    messages_column: str | None = Field(
        None,
        description="column holding a chat list [{role, content}, ...] ending with a user turn; when set it is "
        "used instead of prompt_column, and the system prompt and earlier turns go through the chat template",
    )
    metadata_columns: list[str] = Field(
        [],
        description="columns carried with each row, as JSON values, to the reward (score(..., metadata=)), the "
        "rollout and the review page, e.g. ['answer']",
    )
    heldout_rows: int = Field(
        0,
        ge=0,
        description="rows held out of training (a count, not a fraction), picked by a permutation seeded by "
        "`seed`, the same on every start; PromptData.heldout, disjoint from training by row",
    )
    heldout_path: str | None = Field(
        None,
        description="a dataset of its own for the held-out rows (a test split: same formats and columns as "
        "`path`), instead of heldout_rows taken out of `path`; never trained on",
    )
    seed: int | None = Field(
        None, description="seed of the held-out pick and of every epoch's shuffle (None: policy.seed)"
    )
    shuffle: bool = Field(True, description="each epoch in its own seeded order (False: file order every epoch)")
    epochs: int | None = Field(
        None,
        ge=1,
        description="passes over the training rows; after the last the actor stops producing and the trainer "
        "finishes what is queued, persists and exits 0 (None: cycle for ever)",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="rows whose templated prompt is longer are skipped at start and counted (logged, and "
        "the belay_data_rows_skipped gauge); None: policy.max_prompt_tokens",
    )

    @model_validator(mode="after")
    def _columns_named(self) -> DataConfig:
        if not self.prompt_column.strip():
            raise ValueError("prompt_column must name a column")
        if self.messages_column is not None and not self.messages_column.strip():
            raise ValueError("messages_column must name a column, or be left out (null)")
        if self.heldout_path is not None and (self.path is None or self.heldout_rows):
            raise ValueError("heldout_path needs `path` (the training rows) and heldout_rows 0: one held-out set")
        text_column = self.messages_column or self.prompt_column
        if text_column in self.metadata_columns:
            raise ValueError(f"metadata_columns holds {text_column!r}, the prompt's own column")
        duplicates = sorted({c for c in self.metadata_columns if self.metadata_columns.count(c) > 1})
        if duplicates:
            raise ValueError(f"metadata_columns: names must be unique (repeated: {duplicates})")
        return self
