"""Prompt data (services/common/prompt_data.py): every file format the `datasets` library reads from a
local path gives the same rows; a messages column keeps the system prompt and earlier turns for the
chat template; metadata columns travel as JSON values; the held-out split is disjoint and the same on
every load; rows over the prompt-token limit are skipped and counted; and each kind of bad input is
refused at load with the file, the column and the row named. Fixtures are written into tmp_path."""

from __future__ import annotations

import json
import pathlib

import datasets
import pytest

from services.common.config import BelayConfig
from services.common.prompt_data import DataError, PromptRow, load_prompt_data
from services.policy.engine import apply_chat_template, templated_length

ROWS = [
    {
        "prompt": f"Question {i}: what is {i} + {i}?",
        "answer": str(2 * i),
        "tests": {"cases": [i, i + 1], "name": f"t{i}"},
    }
    for i in range(10)
]


def config(path, **data) -> BelayConfig:
    return BelayConfig.model_validate({"data": {"path": str(path), **data}})


def write_rows(tmp_path: pathlib.Path, kind: str, rows: list[dict] = ROWS) -> pathlib.Path:
    """The rows in one format: jsonl, json (an array), parquet, csv, arrow, or a save_to_disk directory."""
    table = datasets.Dataset.from_list(rows) if kind not in ("jsonl", "json") else None
    if kind == "jsonl":
        path = tmp_path / "rows.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    elif kind == "json":
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(rows))
    elif kind == "parquet":
        path = tmp_path / "rows.parquet"
        table.to_parquet(str(path))
    elif kind == "csv":
        path = tmp_path / "rows.csv"
        table.to_csv(str(path), index=False)
    elif kind == "disk":
        path = tmp_path / "saved"
        table.save_to_disk(str(path))
    elif kind == "dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
    else:
        saved = tmp_path / "for_arrow"
        table.save_to_disk(str(saved))
        path = tmp_path / "rows.arrow"
        path.write_bytes(next(saved.glob("*.arrow")).read_bytes())
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "disk", "dict"])
def test_every_format_gives_the_rows_with_their_metadata(kind, tmp_path):
    data = load_prompt_data(config(write_rows(tmp_path, kind), metadata_columns=["answer", "tests"]))
    assert [row.text for row in data.train] == [row["prompt"] for row in ROWS]
    assert [row.metadata for row in data.train] == [{"answer": r["answer"], "tests": r["tests"]} for r in ROWS]
    assert all(row.messages is None for row in data.train) and data.heldout == []


def test_metadata_of_any_json_shape_travels_as_it_was_written(tmp_path):
    rows = [
        {"prompt": "a", "answer": 3},
        {"prompt": "b", "answer": [1, {"x": None}]},
        {"prompt": "c", "answer": "seven"},
    ]
    data = load_prompt_data(config(write_rows(tmp_path, "jsonl", rows), metadata_columns=["answer"]))
    assert [row.metadata["answer"] for row in data.train] == [3, [1, {"x": None}], "seven"]


def test_csv_gives_the_rows_with_every_cell_as_the_text_written(tmp_path):
    flat = [{"prompt": r["prompt"], "answer": r["answer"]} for r in ROWS] + [
        {"prompt": "Pad, then quote", "answer": "007"}
    ]
    data = load_prompt_data(config(write_rows(tmp_path, "csv", flat), metadata_columns=["answer"]))
    assert [(row.text, row.metadata) for row in data.train] == [(r["prompt"], {"answer": r["answer"]}) for r in flat]


def test_a_messages_column_keeps_the_system_prompt_and_earlier_turns_for_the_template(tmp_path, tiny_tokenizer):
    conversation = [
        {"role": "system", "content": "You answer in one number."},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3 + 3?"},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": conversation, "answer": "6"}) + "\n")
    data = load_prompt_data(config(path, messages_column="messages", metadata_columns=["answer"]))
    (row,) = data.train
    assert row.text == "And 3 + 3?"  # what the reward, the rollout and the review page see
    assert row.messages == conversation and row.metadata == {"answer": "6"}
    templated = tiny_tokenizer.decode(apply_chat_template(tiny_tokenizer, row.chat))
    expected = tiny_tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    assert templated == expected  # the whole chat, through the tokenizer's own template
    for message in conversation:
        assert message["content"] in templated


def test_the_heldout_split_is_disjoint_the_same_on_every_load_and_moved_by_the_seed(tmp_path):
    path = write_rows(tmp_path, "jsonl")
    first = load_prompt_data(config(path, heldout_rows=3, seed=7))
    again = load_prompt_data(config(path, heldout_rows=3, seed=7))
    other = load_prompt_data(config(path, heldout_rows=3, seed=8))
    train, heldout = {r.text for r in first.train}, {r.text for r in first.heldout}
    assert len(heldout) == 3 and not train & heldout and train | heldout == {r["prompt"] for r in ROWS}
    assert first.heldout == again.heldout and first.train == again.train
    assert [r.text for r in first.train] == [r["prompt"] for r in ROWS if r["prompt"] not in heldout]  # file order
    assert {r.text for r in other.heldout} != heldout


def test_rows_over_the_prompt_limit_are_skipped_and_counted(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "short"}, {"prompt": "long " * 300}, {"prompt": "also short"}]
    path = write_rows(tmp_path, "jsonl", rows)
    count = templated_length(tiny_tokenizer)
    limit = count(PromptRow("also short"))
    data = load_prompt_data(config(path, max_prompt_tokens=limit), count)
    assert [r.text for r in data.train] == ["short", "also short"] and data.skipped_too_long == 1
    unset = BelayConfig.model_validate({"data": {"path": str(path)}, "policy": {"max_prompt_tokens": limit}})
    assert load_prompt_data(unset, count).skipped_too_long == 1  # the default limit: policy.max_prompt_tokens
    with pytest.raises(DataError, match="every training row's templated prompt is over 2 tokens"):
        load_prompt_data(config(path, max_prompt_tokens=2), count)


def test_the_prompts_file_keeps_working_without_metadata_or_heldout(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# a comment\nFirst prompt\n\nSecond prompt\n")
    data = load_prompt_data(BelayConfig.model_validate({"policy": {"prompts_file": str(path)}}))
    assert data.train == [PromptRow("First prompt"), PromptRow("Second prompt")] and data.heldout == []
    assert data.source == str(path)


def bad_messages(tmp_path, messages) -> pathlib.Path:
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "fine"}]}) + "\n")
    path.write_text(path.read_text() + json.dumps({"messages": messages}) + "\n")
    return path


@pytest.mark.parametrize(
    "make, settings, words",
    [
        (lambda t: t / "absent.jsonl", {}, r"data.path .*absent.jsonl does not exist"),
        (lambda t: t / "rows.txt", {}, r"rows.txt: unknown format '.txt'"),
        (lambda t: t / "broken.jsonl", {}, r"broken.jsonl cannot be read as a dataset"),
        (lambda t: t / "empty.jsonl", {}, r"empty.jsonl holds no rows"),
        (
            lambda t: write_rows(t, "jsonl"),
            {"prompt_column": "question"},
            r"no column 'question' \(data.prompt_column\)",
        ),
        (
            lambda t: write_rows(t, "jsonl"),
            {"metadata_columns": ["solution"]},
            r"no column 'solution' \(data.metadata_c",
        ),
        (lambda t: write_rows(t, "jsonl"), {"messages_column": "chat"}, r"no column 'chat' \(data.messages_column\)"),
        (lambda t: write_rows(t, "jsonl", [{"prompt": "a"}, {"prompt": ""}]), {}, r"row 1, column 'prompt'.*non-empty"),
        (lambda t: write_rows(t, "jsonl"), {"heldout_rows": 10}, r"data.heldout_rows=10 leaves no training rows"),
        (lambda t: bad_messages(t, "hello"), {"messages_column": "messages"}, r"row 1, column 'messages'.*list"),
        (
            lambda t: bad_messages(t, [{"role": "robot", "content": "x"}]),
            {"messages_column": "messages"},
            r"row 1, column 'messages': message 0 has role 'robot'",
        ),
        (
            lambda t: bad_messages(t, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]),
            {"messages_column": "messages"},
            r"row 1, column 'messages': the last message must be the user's",
        ),
    ],
)
def test_bad_input_is_refused_at_load_naming_the_file_and_the_column(make, settings, words, tmp_path):
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "rows.txt").write_text("a\n")
    with pytest.raises(DataError, match=words):
        load_prompt_data(config(make(tmp_path), **settings))


@pytest.mark.parametrize("name", ["empty.parquet", "header_only.csv"])
def test_an_empty_dataset_is_refused_naming_the_file(name, tmp_path):
    path = tmp_path / name
    if name.endswith(".parquet"):
        datasets.Dataset.from_dict({"prompt": []}).to_parquet(str(path))
    else:
        path.write_text("prompt,answer\n")
    with pytest.raises(DataError, match=rf"{name} holds no rows"):
        load_prompt_data(config(path))


def test_a_missing_prompts_file_is_refused_naming_the_setting(tmp_path):
    with pytest.raises(DataError, match=r"policy.prompts_file .*nothing.txt does not exist"):
        load_prompt_data(BelayConfig.model_validate({"policy": {"prompts_file": str(tmp_path / "nothing.txt")}}))


def test_a_held_out_file_of_its_own_gives_the_held_out_rows(tmp_path):
    train_dir, test_dir = tmp_path / "train", tmp_path / "test"
    train_dir.mkdir(), test_dir.mkdir()
    train = write_rows(train_dir, "jsonl", ROWS[:7])
    test = write_rows(test_dir, "parquet", ROWS[7:])
    data = load_prompt_data(config(train, heldout_path=str(test), metadata_columns=["answer"]))
    assert [row.text for row in data.train] == [row["prompt"] for row in ROWS[:7]]
    assert [(row.text, row.metadata) for row in data.heldout] == [
        (row["prompt"], {"answer": row["answer"]}) for row in ROWS[7:]
    ]
    lacking = write_rows(tmp_path, "jsonl", [{"prompt": "What is 1 + 1?"}])
    with pytest.raises(DataError, match=rf"data.heldout_path {lacking} has no column 'answer'"):
        load_prompt_data(config(train, heldout_path=str(lacking), metadata_columns=["answer"]))
    with pytest.raises(ValueError, match="heldout_path needs `path`"):
        config(train, heldout_path=str(test), heldout_rows=2)
