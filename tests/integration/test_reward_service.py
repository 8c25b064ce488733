"""The reward service over real gRPC: the VADER and Hugging Face classifier backends score what
they should, bad requests are refused while it keeps serving, and bad reward models fail at load."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaForSequenceClassification
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from belay.v1 import belay_pb2
from services.reward.server import RewardServicer
from tests.tiny_models import build_tokenizer, llama_config

from .conftest import RPC_TIMEOUT, make_config, rpc_error, running_reward

PROMPTS = [
    "Tell me about your weekend.",
    "How are you feeling today?",
    "Describe a walk in the park.",
    "Say something.",
]
RESPONSES = [
    "I love this, it is wonderful and I am so happy!",
    "This is terrible, awful and sad. I hate it.",
    "The park was a park.",
    "",
]


def score(stub, prompts, responses) -> belay_pb2.ScoreResponse:
    return stub.Score(belay_pb2.ScoreRequest(prompts=prompts, responses=responses), timeout=RPC_TIMEOUT)


@pytest.fixture(scope="module")
def vader():
    with running_reward(make_config({"max_batch_size": 4}, reward={"backend": "vader"})) as running:
        yield running


@pytest.fixture(scope="module")
def classifier(tiny_reward_dir):
    config = make_config(reward={"backend": "hf_classifier", "model_dir": str(tiny_reward_dir)})
    with running_reward(config) as running:
        yield running


def test_vader_scores_equal_vader_compound_sentiment_of_the_response(vader):
    reply = score(vader.stub, PROMPTS, RESPONSES)
    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(text)["compound"] for text in RESPONSES]
    assert len(reply.scores) == len(RESPONSES)
    np.testing.assert_allclose(reply.scores, expected, atol=1e-6)
    assert reply.scores[0] > 0.5 > -0.5 > reply.scores[1]
    assert reply.scores[0] > reply.scores[1]
    assert reply.reward_model_id == "vader-sentiment"
    info = vader.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.service == "reward" and info.model_id == "vader-sentiment"
    assert info.model_revision == reply.reward_model_revision != ""


def test_vader_scores_the_response_not_the_prompt(vader):
    happy_prompt = score(vader.stub, ["I love you, wonderful friend!"], ["The sky is blue."])
    sad_prompt = score(vader.stub, ["I hate this awful day."], ["The sky is blue."])
    assert happy_prompt.scores[0] == sad_prompt.scores[0]


def test_classifier_scores_equal_an_independent_forward_of_the_chat_templated_text(classifier, tiny_reward_dir):
    reply = score(classifier.stub, PROMPTS, RESPONSES)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_reward_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    expected = []
    for prompt, response in zip(PROMPTS, RESPONSES):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
        )
        assert text.startswith("<|im_start|>user\n" + prompt)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            expected.append(float(model(**ids).logits[0, 0]))
    assert len(reply.scores) == len(PROMPTS)
    np.testing.assert_allclose(reply.scores, expected, atol=1e-5, rtol=0)
    assert len(set(np.round(expected, 3))) > 1  # the texts really score differently
    assert reply.reward_model_id == str(tiny_reward_dir)


def test_classifier_info_names_the_reward_model(classifier, tiny_reward_dir):
    info = classifier.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.service == "reward"
    assert info.model_id == str(tiny_reward_dir)
    assert info.tokenizer_fingerprint == ""
    assert info.policy_version == 0
    assert info.model_revision == score(classifier.stub, ["a"], ["b"]).reward_model_revision != ""


@pytest.mark.parametrize(
    "prompts, responses, code, words",
    [
        ([], [], grpc.StatusCode.INVALID_ARGUMENT, "empty batch"),
        (["a", "b"], ["c"], grpc.StatusCode.INVALID_ARGUMENT, "prompts has 2 rows but responses has 1"),
        (["a"], ["b", "c"], grpc.StatusCode.INVALID_ARGUMENT, "prompts has 1 rows but responses has 2"),
        (["a"] * 5, ["b"] * 5, grpc.StatusCode.RESOURCE_EXHAUSTED, "max_batch_size=4"),
    ],
    ids=["empty", "more-prompts", "more-responses", "over-batch-limit"],
)
def test_bad_score_requests_are_refused_and_the_server_keeps_serving(vader, prompts, responses, code, words):
    error = rpc_error(vader.stub.Score, belay_pb2.ScoreRequest(prompts=prompts, responses=responses))
    assert error.code() == code
    assert words in error.details()
    assert len(score(vader.stub, ["a"] * 4, ["good"] * 4).scores) == 4


def test_classifier_backend_on_a_directory_that_is_not_a_model_fails_naming_the_setting(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    config = make_config(reward={"backend": "hf_classifier", "model_dir": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="reward.model_dir") as caught:
        RewardServicer(config, CollectorRegistry()).load()
    assert str(tmp_path) in str(caught.value)


def test_classifier_with_two_labels_is_refused(tmp_path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    LlamaForSequenceClassification(llama_config(tokenizer, num_labels=2)).save_pretrained(
        tmp_path, safe_serialization=True
    )
    tokenizer.save_pretrained(tmp_path)
    config = make_config(reward={"backend": "hf_classifier", "model_dir": str(tmp_path)})
    with pytest.raises(ValueError, match="num_labels=2"):
        RewardServicer(config, CollectorRegistry()).load()


def test_classifier_backend_without_a_model_dir_is_a_config_error():
    with pytest.raises(ValueError, match="model_dir is required when backend is 'hf_classifier'"):
        make_config(reward={"backend": "hf_classifier"})
