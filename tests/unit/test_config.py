"""load_config (services/common/config.py): seed defaults, env overrides, errors that name the field."""

from __future__ import annotations

import pathlib

import pytest

from services.common.config import ConfigError, load_config


def write(tmp_path: pathlib.Path, text: str) -> pathlib.Path:
    path = tmp_path / "belay.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_seeds():
    config = load_config(None, environ={})
    assert config.policy.temperature == 1.0
    assert config.trainer.temperature == 1.0
    assert config.policy.top_p == 0.9
    assert config.policy.max_new_tokens == 128
    assert config.trainer.ppo_epochs == 1
    assert config.trainer.max_grad_norm > 0  # clipping on
    assert config.trainer.clip_eps == 0.2


def test_yaml_values_are_read(tmp_path):
    config = load_config(
        write(tmp_path, "policy:\n  top_p: 0.8\n  max_new_tokens: 48\ntrainer:\n  ppo_epochs: 2\n"), environ={}
    )
    assert config.policy.top_p == 0.8
    assert config.policy.max_new_tokens == 48
    assert config.trainer.ppo_epochs == 2


def test_env_override_wins_over_yaml(tmp_path):
    path = write(tmp_path, "trainer:\n  lr: 1.0e-5\n")
    assert load_config(path, environ={}).trainer.lr == 1e-5
    config = load_config(path, environ={"BELAY_TRAINER__LR": "3e-5"})
    assert config.trainer.lr == 3e-5


def test_env_override_is_read_from_the_process_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BELAY_TRAINER__LR", "3e-5")
    monkeypatch.setenv("BELAY_POLICY__RUN_ACTOR", "false")
    config = load_config(write(tmp_path, "trainer:\n  lr: 1.0e-5\n"))
    assert config.trainer.lr == 3e-5
    assert config.policy.run_actor is False


def test_environment_variables_without_the_prefix_or_separator_are_ignored():
    config = load_config(None, environ={"TRAINER__LR": "5", "BELAY_TRAINER_LR": "5", "OTHER": "x"})
    assert config.trainer.lr == 1e-5


def test_bad_value_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match=r"policy\.top_p"):
        load_config(write(tmp_path, "policy:\n  top_p: 1.5\n"), environ={})


def test_bad_env_value_names_the_field():
    with pytest.raises(ConfigError, match=r"trainer\.lr"):
        load_config(None, environ={"BELAY_TRAINER__LR": "-1"})


def test_every_bad_field_is_named_at_once(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_config(write(tmp_path, "policy:\n  top_p: 0\n  max_new_tokens: 0\n"), environ={})
    assert "policy.top_p" in str(error.value)
    assert "policy.max_new_tokens" in str(error.value)


@pytest.mark.parametrize("value", ["0", "null", "-1"])
def test_max_grad_norm_zero_null_or_negative_is_refused(tmp_path, value):
    with pytest.raises(ConfigError, match="gradient clipping") as error:
        load_config(write(tmp_path, f"trainer:\n  max_grad_norm: {value}\n"), environ={})
    assert "trainer.max_grad_norm" in str(error.value)


def test_max_grad_norm_cannot_be_switched_off_from_the_environment():
    with pytest.raises(ConfigError, match="gradient clipping"):
        load_config(None, environ={"BELAY_TRAINER__MAX_GRAD_NORM": "0"})


def test_ppo_epochs_above_four_refused_unless_forced(tmp_path):
    with pytest.raises(ConfigError, match="ppo_epochs") as error:
        load_config(write(tmp_path, "trainer:\n  ppo_epochs: 5\n"), environ={})
    assert "force_ppo_epochs" in str(error.value)
    assert load_config(write(tmp_path, "trainer:\n  ppo_epochs: 4\n"), environ={}).trainer.ppo_epochs == 4
    forced = load_config(write(tmp_path, "trainer:\n  ppo_epochs: 5\n  force_ppo_epochs: true\n"), environ={})
    assert forced.trainer.ppo_epochs == 5


def test_minibatch_larger_than_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="minibatch_size"):
        load_config(write(tmp_path, "trainer:\n  batch_size: 4\n  minibatch_size: 8\n"), environ={})


def test_mismatched_policy_and_trainer_temperature_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="temperature") as error:
        load_config(write(tmp_path, "policy:\n  temperature: 0.7\n"), environ={})
    assert "trainer.temperature" in str(error.value) and "policy.temperature" in str(error.value)
    config = load_config(write(tmp_path, "policy:\n  temperature: 0.7\ntrainer:\n  temperature: 0.7\n"), environ={})
    assert config.policy.temperature == config.trainer.temperature == 0.7


def test_unknown_field_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.learning_rate"):
        load_config(write(tmp_path, "trainer:\n  learning_rate: 1.0e-5\n"), environ={})


def test_unknown_field_from_the_environment_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"policy\.tempreature"):
        load_config(None, environ={"BELAY_POLICY__TEMPREATURE": "0.7"})


def test_unknown_section_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="critic"):
        load_config(write(tmp_path, "critic:\n  lr: 1\n"), environ={})


def test_missing_file_gives_a_clear_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist") as error:
        load_config(missing, environ={})
    assert str(missing) in str(error.value)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_yaml_gives_a_clear_error(tmp_path, text):
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(write(tmp_path, text), environ={})


def test_invalid_yaml_gives_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "policy: [unclosed\n"), environ={})


def test_empty_file_gives_the_defaults(tmp_path):
    assert load_config(write(tmp_path, ""), environ={}).policy.top_p == 0.9


def test_hf_classifier_without_model_dir_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="model_dir") as error:
        load_config(write(tmp_path, "reward:\n  backend: hf_classifier\n"), environ={})
    assert "reward" in str(error.value)
    config = load_config(write(tmp_path, "reward:\n  backend: hf_classifier\n  model_dir: /models/rm\n"), environ={})
    assert config.reward.model_dir == "/models/rm"


def test_unknown_reward_backend_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"reward\.backend"):
        load_config(write(tmp_path, "reward:\n  backend: gpt_judge\n"), environ={})


def test_env_override_into_a_non_mapping_section_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="trainer"):
        load_config(write(tmp_path, "trainer: 3\n"), environ={"BELAY_TRAINER__LR": "1e-5"})


def test_validated_config_refuses_bad_assignment():
    config = load_config(None, environ={})
    with pytest.raises(ValueError):
        config.policy.top_p = 2.0


def test_an_overlong_band_wider_than_the_response_cap_is_refused_by_both_names():
    with pytest.raises(ConfigError, match="overlong_band_tokens=64 exceeds policy.max_new_tokens=48"):
        load_config(
            None,
            environ={
                "BELAY_TRAINER__OVERLONG_PENALTY": "1.0",
                "BELAY_TRAINER__OVERLONG_BAND_TOKENS": "64",
                "BELAY_POLICY__MAX_NEW_TOKENS": "48",
            },
        )
    off = {"BELAY_TRAINER__OVERLONG_BAND_TOKENS": "64", "BELAY_POLICY__MAX_NEW_TOKENS": "48"}
    assert load_config(None, environ=off).trainer.overlong_penalty == 0.0  # off: the band is not read


def test_tensorboard_dir_is_off_by_default_and_expands_home(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config(None, environ={}).run.tensorboard_dir is None
    assert load_config(None, environ={"BELAY_RUN__TENSORBOARD_DIR": ""}).run.tensorboard_dir is None
    config = load_config(None, environ={"BELAY_RUN__TENSORBOARD_DIR": "~/tb"})
    assert config.run.tensorboard_dir == str(tmp_path / "tb")


# --- paths and the data section (issue 16) ---


def test_every_path_expands_the_home_directory_in_the_file_an_override_and_an_assignment(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = load_config(
        write(tmp_path, "policy:\n  model_dir: ~/models/x\n  prompts_file: ~/p.txt\ndata:\n  path: ~/d.jsonl\n"),
        environ={"BELAY_TRAINER__MODEL_DIR": "~/models/y", "BELAY_RUN__CHECKPOINT_DIR": "~/ckpt"},
    )
    assert config.policy.model_dir == f"{tmp_path}/models/x" and config.policy.prompts_file == f"{tmp_path}/p.txt"
    assert config.data.path == f"{tmp_path}/d.jsonl" and config.trainer.model_dir == f"{tmp_path}/models/y"
    assert config.run.checkpoint_dir == f"{tmp_path}/ckpt"
    config.reference.model_dir = "~/models/z"
    assert config.reference.model_dir == f"{tmp_path}/models/z"
    config.reward.function = "~mod:f"  # not a path: left alone
    assert config.reward.function == "~mod:f"


def test_the_data_section_defaults_to_the_prompts_file_and_takes_overrides():
    assert load_config(None, environ={}).data.path is None
    config = load_config(
        None,
        environ={
            "BELAY_DATA__PATH": "/data/math.parquet",
            "BELAY_DATA__METADATA_COLUMNS": "[answer, tests]",
            "BELAY_DATA__HELDOUT_ROWS": "50",
            "BELAY_DATA__EPOCHS": "2",
            "BELAY_DATA__MESSAGES_COLUMN": "messages",
        },
    )
    data = config.data
    assert (data.path, data.metadata_columns, data.heldout_rows, data.epochs) == (
        "/data/math.parquet",
        ["answer", "tests"],
        50,
        2,
    )
    assert data.messages_column == "messages" and data.shuffle is True and data.max_prompt_tokens is None


@pytest.mark.parametrize(
    "data, words",
    [
        ("  metadata_columns: [prompt]\n", r"data: .*metadata_columns holds 'prompt', the prompt's own column"),
        ("  metadata_columns: [a, a]\n", r"names must be unique \(repeated: \['a'\]\)"),
        ("  epochs: 0\n", r"data\.epochs"),
        ("  heldout_rows: -1\n", r"data\.heldout_rows"),
        ("  row_limit: 5\n", r"data\.row_limit"),
    ],
)
def test_bad_data_settings_are_refused_naming_the_field(tmp_path, data, words):
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, "data:\n" + data), environ={})


def test_a_model_dir_that_is_not_a_model_directory_is_refused_by_name_before_transformers(tmp_path):
    from services.common.models import load_tokenizer

    with pytest.raises(FileNotFoundError, match=r"policy.model_dir: '.*/models/x' is not a Hugging Face model"):
        load_tokenizer(str(tmp_path / "models" / "x"), "policy.model_dir")
    with pytest.raises(FileNotFoundError, match=r"policy.model_dir: '' is not a Hugging Face model directory"):
        load_tokenizer("", "policy.model_dir")


def test_trainer_parallelism_is_ddp_by_default_and_refuses_other_values(tmp_path):
    assert load_config(None, environ={}).trainer.parallelism == "ddp"
    assert load_config(None, environ={"BELAY_TRAINER__PARALLELISM": "fsdp"}).trainer.parallelism == "fsdp"
    with pytest.raises(ConfigError, match="parallelism"):
        load_config(write(tmp_path, "trainer:\n  parallelism: zero3\n"), environ={})
