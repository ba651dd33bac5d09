# The two commands a newcomer needs (see README.md):
#   make pipeline   run every stage (dvc repro) on the embedded default data
#   make test       run the test suite CI runs (all but the two multi-minute `slow` science tests)
#   make test-all   the whole suite, `slow` included (~15 min on 2 cores)
#   make pipeline-long  the embedded pipeline trained 9x longer (deploy/params.long.yaml) in its own
#                   workspace beside this one ($(LONG_WORKSPACE)); about 52 minutes on 2 cores
#   make pipeline-flickr8k  real photos (Flickr8k, ../shared/data) with pretrained, locked towers
#                   (deploy/params.flickr8k.yaml) in its own workspace ($(FLICKR8K_WORKSPACE))
#   make ablation   the paper's Fig 2a-c sweep (ablation/dvc.yaml; about an hour on 2 cores)
# Both create and install .venv first when it is missing or stale.
SHELL := /bin/bash
VENV ?= .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
ENV := source scripts/env.sh &&

LONG_WORKSPACE ?= $(CURDIR)-long
FLICKR8K_WORKSPACE ?= $(CURDIR)-flickr8k

.PHONY: setup pipeline pipeline-long pipeline-flickr8k test test-all ablation

setup:
	@bash scripts/setup.sh

pipeline: setup
	@$(ENV) python -m pipeline.runtime.shared_cluster dvc repro  # every stage joins one local Ray cluster

pipeline-long: setup
	@$(ENV) python -m pipeline.runtime.job --workspace $(LONG_WORKSPACE) --params-override deploy/params.long.yaml

pipeline-flickr8k: setup
	@$(ENV) python -m pipeline.runtime.job --workspace $(FLICKR8K_WORKSPACE) --params-override deploy/params.flickr8k.yaml $(if $(STAGES),-- $(STAGES))

test: setup
	@$(ENV) python -m pytest -m "not slow" --durations=25 $(PYTEST_ARGS)

test-all: setup
	@$(ENV) python -m pytest $(PYTEST_ARGS)


ablation: setup
	@$(ENV) dvc repro ablation/dvc.yaml
