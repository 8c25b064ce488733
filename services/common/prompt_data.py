"""The actor's prompts: rows of a local dataset (config.data; read with the `datasets` library) or the
lines of policy.prompts_file, each a PromptRow with its user-visible text, its chat messages (a
messages column) and the metadata carried to the reward. Everything wrong with the data is refused
here, at start, with the file and the column named; nothing about it fails later.

Held-out rows are picked by a permutation seeded by data.seed over every row, before any length
filter, so every reader of the same config (the actor, an evaluation) holds the same split."""

from __future__ import annotations

import csv
import json
import logging
import pathlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .config import BelayConfig
from .data_config import DataConfig
from .prompts import read_prompts

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file, the column and the row."""


@dataclass(frozen=True)
class PromptRow:
    """One prompt: `text` is what the reward, the rollout's prompt_text and the review page see (a
    messages row's last user turn); `messages` the whole chat the policy templates (None: text is
    the one user message); `metadata` the carried columns (JSON values; {} when none)."""

    text: str
    messages: list[dict] | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def chat(self) -> str | list[dict]:
        """What the policy templates: the messages, or the text as one user turn."""
        return self.messages if self.messages is not None else self.text


@dataclass
class PromptData:
    train: list[PromptRow]
    heldout: list[PromptRow]
    source: str  # the file read, for logs and the data position's record
    skipped_too_long: int = 0  # rows over the prompt-token limit, left out of train and heldout


def check_messages(messages, where: str) -> list[dict]:
    """A chat list [{role, content}, ...] ending with a user turn (the policy writes the answer);
    DataError naming `where` otherwise. Returns plain {role, content} dicts."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where}: expected a non-empty list of {{role, content}} messages, got {short(messages)}")
    checked = []
    for position, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            raise DataError(
                f"{where}: message {position} is not {{role, content}} with string content: {short(message)}"
            )
        if message.get("role") not in ROLES:
            raise DataError(f"{where}: message {position} has role {message.get('role')!r}, not one of {ROLES}")
        checked.append({"role": message["role"], "content": message["content"]})
    if checked[-1]["role"] != "user":
        raise DataError(
            f"{where}: the last message must be the user's (the policy answers it), not {checked[-1]['role']}"
        )
    return checked


def short(value, limit: int = 100) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def read_dataset(path: str, setting: str = "data.path"):
    """The rows of a local dataset file or save_to_disk directory, as a datasets.Dataset."""
    import datasets

    source = pathlib.Path(path)
    if not source.exists():
        raise DataError(f"{setting} {path} does not exist")
    datasets.disable_progress_bars()
    try:
        if source.is_dir():
            loaded = datasets.load_from_disk(str(source), keep_in_memory=True)
            if isinstance(loaded, datasets.DatasetDict):
                if "train" not in loaded and len(loaded) != 1:
                    raise DataError(f"{setting} {path} holds splits {sorted(loaded)} and none is 'train': save one")
                loaded = loaded["train"] if "train" in loaded else next(iter(loaded.values()))
            return loaded
        kind = FORMATS.get(source.suffix.lower())
        if kind is None:
            raise DataError(f"{setting} {path}: unknown format {source.suffix!r} (known: {', '.join(FORMATS)})")
        if kind == "arrow":
            return datasets.Dataset.from_file(str(source), in_memory=True)
        options = csv_as_text(source, datasets) if kind == "csv" else {}
        with tempfile.TemporaryDirectory(prefix="belay-data-") as cache:  # no cache left behind to go stale
            return datasets.load_dataset(
                kind, data_files=str(source), split="train", cache_dir=cache, keep_in_memory=True, **options
            )
    except DataError:
        raise
    except Exception as error:  # datasets and pyarrow raise many kinds; each means this file cannot be read
        if isinstance(error, StopIteration) or "corresponds to no data" in str(error):  # how datasets says empty
            raise DataError(f"{setting} {path} holds no rows") from None
        detail = f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
        cause = error.__cause__ or error.__context__
        if cause is not None and str(cause):
            detail += f" ({type(cause).__name__}: {str(cause)[:300]})"
        raise DataError(f"{setting} {path} cannot be read as a dataset: {detail}") from None


def csv_as_text(source: pathlib.Path, datasets) -> dict:
    """CSV has no types: every cell is read as the text written ("007" stays "007", an empty cell ""),
    rather than guessed at (pandas would make "007" the number 7)."""
    with source.open(newline="", encoding="utf-8") as file:
        header = next(csv.reader(file), [])
    return {
        "features": datasets.Features({name: datasets.Value("string") for name in header}),
        "keep_default_na": False,
    }


def dataset_rows(dataset, section: DataConfig, path: str, setting: str = "data.path") -> list[PromptRow]:
    """Every row as a PromptRow, each checked; DataError names the file, the column and the row."""
    text_column = section.messages_column or section.prompt_column
    named = [(text_column, "data.messages_column" if section.messages_column else "data.prompt_column")]
    for column, what in named + [(c, "data.metadata_columns") for c in section.metadata_columns]:
        if column not in dataset.column_names:
            raise DataError(f"{setting} {path} has no column {column!r} ({what}); its columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise DataError(f"{setting} {path} holds no rows")
    rows = []
    columns = dataset.select_columns([text_column, *section.metadata_columns]).to_dict()
    for index in range(len(dataset)):
        where = f"{setting} {path}, row {index}, column {text_column!r}"
        value = columns[text_column][index]
        if section.messages_column:
            messages = check_messages(value, where)
            text = messages[-1]["content"]
        else:
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{where}: expected a non-empty prompt string, got {short(value)}")
            messages, text = None, value
        metadata = {name: columns[name][index] for name in section.metadata_columns}
        try:
            json.dumps(metadata, allow_nan=False)
        except (TypeError, ValueError) as error:
            raise DataError(f"{setting} {path}, row {index}: metadata is not JSON-serialisable: {error}") from None
        rows.append(PromptRow(text=text, messages=messages, metadata=metadata))
    return rows


def split_heldout(rows: list[PromptRow], heldout_rows: int, seed: int) -> tuple[list[PromptRow], list[PromptRow]]:
    """(train, heldout): heldout_rows rows picked by a permutation seeded by `seed`, the rest in
    their original order. Disjoint by row."""
    if heldout_rows == 0:
        return list(rows), []
    if heldout_rows >= len(rows):
        raise DataError(f"data.heldout_rows={heldout_rows} leaves no training rows: the data holds {len(rows)}")
    picked = set(np.random.default_rng(seed).permutation(len(rows))[:heldout_rows].tolist())
    return [r for i, r in enumerate(rows) if i not in picked], [r for i, r in enumerate(rows) if i in picked]


def data_seed(config: BelayConfig) -> int:
    """data.seed, or policy.seed when it is unset (the seed the prompts file was always shuffled with)."""
    return config.data.seed if config.data.seed is not None else config.policy.seed


def load_prompt_data(config: BelayConfig, prompt_tokens: Callable[[PromptRow], int] | None = None) -> PromptData:
    """The train and held-out rows config.data names (data.path empty: policy.prompts_file's lines,
    no metadata, no held-out rows). With `prompt_tokens` (a row's templated length; the policy's
    tokenizer), rows over data.max_prompt_tokens (default policy.max_prompt_tokens) are skipped and
    counted. DataError, naming the file and the column, for anything unusable."""
    section = config.data
    if section.path is None:
        try:
            rows = [PromptRow(text=line) for line in read_prompts(config.policy.prompts_file)]
        except (FileNotFoundError, ValueError) as error:
            raise DataError(str(error)) from None
        train, heldout, source = rows, [], config.policy.prompts_file
    else:
        rows = dataset_rows(read_dataset(section.path), section, section.path)
        train, heldout = split_heldout(rows, section.heldout_rows, data_seed(config))
        if section.heldout_path is not None:  # a test split of its own
            where = "data.heldout_path"
            heldout = dataset_rows(read_dataset(section.heldout_path, where), section, section.heldout_path, where)
        source = section.path
    skipped = 0
    if prompt_tokens is not None:
        limit = section.max_prompt_tokens or config.policy.max_prompt_tokens
        kept_train = [row for row in train if prompt_tokens(row) <= limit]
        kept_heldout = [row for row in heldout if prompt_tokens(row) <= limit]
        skipped = len(train) + len(heldout) - len(kept_train) - len(kept_heldout)
        if skipped:
            log.warning("%s: %d rows skipped, their templated prompts over %d tokens", source, skipped, limit)
        if not kept_train:
            raise DataError(
                f"{source}: every training row's templated prompt is over {limit} tokens "
                "(data.max_prompt_tokens, default policy.max_prompt_tokens): nothing to train on"
            )
        train, heldout = kept_train, kept_heldout
    log.info("%s: %d training rows, %d held out", source, len(train), len(heldout))
    return PromptData(train=train, heldout=heldout, source=source, skipped_too_long=skipped)
