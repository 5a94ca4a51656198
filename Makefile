# Two commands do all set-up on a fresh machine:
#   make demo   venv, emoji shards, local Ray head, staged training via `ray job submit`, report
#   make test   venv, then the whole test suite (unit tests and the Ray integration run)

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(CURDIR)/$(VENV)/bin
RUN ?= emoji-demo
DASHBOARD := 127.0.0.1:8265

# the job finds data, runs and the MLflow store here, whatever Ray's copy of the code
export CMACLIP_HOME := $(CURDIR)
# keep Ray's token authentication on, for the head and for `ray job submit`
export RAY_AUTH_MODE := token
# Serve behind HAProxy for `ray start`, `serve run` and `cmaclip serve` (SERVE_ENVIRONMENT in
# cmaclip/serving.py says why); RAY_SERVE_ENABLE_HA_PROXY=0 on the command line for Serve's proxy
export RAY_SERVE_ENABLE_HA_PROXY ?= 1
export RAY_SERVE_HAPROXY_NBTHREAD ?= 1
export PATH := $(BIN):$(PATH)

.PHONY: install demo data train-job evaluate ray-up ray-down test test-fast lint mlflow clean
.PHONY: serve bench-serve cache tune bench-cache tensorboard bench bench-train

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

data/emoji/dataset.json: | install
	cmaclip data emoji --out data/emoji --cache-dir data/npm

data: data/emoji/dataset.json

ray-up: install
	ray get-auth-token --generate > /dev/null
	ray status > /dev/null 2>&1 || ray start --head --dashboard-host 127.0.0.1 --disable-usage-stats > /dev/null

ray-down:
	-ray stop > /dev/null

train-job: ray-up data
	ray job submit --address http://$(DASHBOARD) --working-dir . \
	  --runtime-env-json '{"env_vars": {"CMACLIP_HOME": "$(CURDIR)"}, "excludes": ["/.venv", "/data", "/runs", "/mlflow.db", "/mlartifacts"]}' \
	  -- python ray_jobs/train.py --config configs/emoji.yaml --run-name $(RUN)

# reloads the exported model without Ray and scores the test split again
evaluate: install
	cmaclip evaluate --model runs/$(RUN)/model --data data/emoji --split test \
	  --out runs/$(RUN)/evaluation.json

demo:
	$(MAKE) train-job; status=$$?; $(MAKE) ray-down; test $$status -eq 0
	$(MAKE) evaluate

# the exported model over HTTP on 127.0.0.1:8000 until Ctrl-C (serve/config.yaml for more)
serve: install
	cmaclip serve --model runs/$(RUN)/model

# 1, 8 and 32 concurrent clients, 60 s each, against the raw in-process throughput
bench-serve: install data
	python benchmarks/serve_load.py --model runs/$(RUN)/model --data data/emoji \
	  --out benchmarks/results/serve_load.json

test: install
	$(BIN)/python -m pytest -q -ra --durations=15

test-fast: install
	$(BIN)/python -m pytest -q -m 'not slow'

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

mlflow: install
	mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1

clean:
	rm -rf runs mlflow.db mlartifacts

# the frozen encoders' outputs of run $(RUN), for searches and cached warm-ups (after `make demo`)
cache: install data
	cmaclip cache --model runs/$(RUN) --data data/emoji --level tokens --out data/cache/$(RUN)-tokens

# 8 trials of the cached warmup stage (configs/search-emoji.yaml); writes runs/emoji-search/best.yaml
tune: install data
	cmaclip tune --config configs/search-emoji.yaml

# warmup epoch time with and without the cache -> benchmarks/results/cache_warmup.json
bench-cache: install data
	$(BIN)/python benchmarks/cache_warmup.py --model runs/$(RUN) --data data/emoji

# Ray Train against a plain loop, data-pipeline wait, memory -> .../train_throughput.json
bench-train: install data
	$(BIN)/python benchmarks/train_throughput.py --init runs/$(RUN)/checkpoints/warmup \
	  --data data/emoji --out benchmarks/results/train_throughput.json --profile

# every benchmark, one after the other (16 minutes on 2 cores), on the model of `make demo`
bench: install data
	@test -f runs/$(RUN)/model/model.json || \
	  { echo "runs/$(RUN) has no exported model: run 'make demo' first"; exit 2; }
	$(MAKE) bench-train
	$(MAKE) bench-cache
	$(MAKE) bench-serve

tensorboard: install
	tensorboard --logdir runs/emoji-search/tune --host 127.0.0.1
