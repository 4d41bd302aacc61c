# Set-up is two commands: `make train` and `make test`. Both install into .venv first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seqlab-installed
# Extra pip arguments, e.g. PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple"
# for a CPU-only machine that has no local CPU wheel of torch.
PIP_ARGS ?=
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast lint format clean help FORCE

help:
	@echo "make install    create $(VENV) and install seqlab with pinned versions (idempotent)"
	@echo "make train      install if needed, then python train.py \$$ARGS"
	@echo "make test       install if needed, then the whole test suite"
	@echo "make test-fast  the fast tier only (-m 'not slow')"
	@echo "make lint       ruff check + ruff format --check"

install: $(STAMP)

# the PIP_ARGS of the last install: other PIP_ARGS (another package index) install again
PIP_ARGS_USED := $(VENV)/.seqlab-pip-args
$(PIP_ARGS_USED): FORCE
	@mkdir -p $(VENV)
	@echo '$(PIP_ARGS)' | cmp -s - $@ || echo '$(PIP_ARGS)' > $@

$(STAMP): pyproject.toml constraints.txt $(PIP_ARGS_USED)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) -c constraints.txt -e ".[loggers,deepspeed,slurm,dev]"
	@touch $(STAMP)

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: install
	$(PY) -m ruff check --fix .
	$(PY) -m ruff format .

clean:
	rm -rf logs/train logs/eval .pytest_cache .ruff_cache

FORCE:
