# Set-up is two commands: `make train` and `make test`. Both install into .venv first when needed.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.seqlab-installed
# Extra pip arguments, e.g. PIP_ARGS="--index-url <a mirror>". Not given: those of the last install
# (`make test` after `make install PIP_ARGS=...` keeps that package index); PIP_ARGS= resets them.
# Without them, a machine without an NVIDIA GPU gets torch's CPU build (see the install recipe).
PIP_ARGS_USED := $(VENV)/.seqlab-pip-args
ifeq ($(origin PIP_ARGS),undefined)
PIP_ARGS := $(shell cat $(PIP_ARGS_USED) 2>/dev/null)
endif
# where a CPU-only machine without a local torch wheel gets torch's CPU build
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: install train test test-fast lint format clean clean-logs help FORCE

help:
	@echo "make install    create $(VENV) and install seqlab with pinned versions (idempotent)"
	@echo "make train      install if needed, then python train.py \$$ARGS"
	@echo "make test       install if needed, then the whole test suite"
	@echo "make test-fast  the fast tier only (-m 'not slow')"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     ruff check --fix + ruff format"
	@echo "make clean      the tools' caches; make clean-logs: every run under logs/"

install: $(STAMP)

# the PIP_ARGS of the last install: other PIP_ARGS (another package index) install again
$(PIP_ARGS_USED): FORCE
	@mkdir -p $(VENV)
	@echo '$(PIP_ARGS)' | cmp -s - $@ || echo '$(PIP_ARGS)' > $@

$(STAMP): pyproject.toml constraints.txt $(PIP_ARGS_USED)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# no NVIDIA GPU and no package index chosen: torch's CPU build (a local wheel in pip's find-links,
	@# else PyTorch's CPU index, unless pip has an index of its own: a mirror) before PyPI's default
	@# CUDA build (several GB) is pulled in. A GPU: nvidia-smi lists one, or its device file is there
	@# (a container without nvidia-smi)
	@if [ -z '$(strip $(PIP_ARGS))' ] && ! nvidia-smi -L >/dev/null 2>&1 && ! ls /dev/nvidia[0-9]* >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet --no-deps --no-index -c constraints.txt torch >/dev/null 2>&1 \
		|| if [ -n "$$PIP_INDEX_URL" ] || $(PY) -m pip config list 2>/dev/null | grep -Eq '(^|\.)index-url='; then \
			echo "no NVIDIA GPU: torch from pip's own index (PIP_ARGS='--index-url $(TORCH_CPU_INDEX) --extra-index-url <yours>' for the CPU build)"; \
		else \
			echo "no NVIDIA GPU: torch's CPU build from $(TORCH_CPU_INDEX)"; \
			$(PY) -m pip install --quiet --retries 1 --timeout 30 --no-deps --index-url $(TORCH_CPU_INDEX) -c constraints.txt torch \
			|| echo "warning: no CPU build of torch from $(TORCH_CPU_INDEX); pip's default index follows (on Linux, the CUDA build)"; \
		fi; \
	fi
	$(PY) -m pip install --quiet --disable-pip-version-check $(PIP_ARGS) -c constraints.txt -e ".[loggers,deepspeed,slurm,dev]"
	@# a GPU machine whose pip finds a local CPU wheel (find-links) would get it: say so
	@if { nvidia-smi -L >/dev/null 2>&1 || ls /dev/nvidia[0-9]* >/dev/null 2>&1; } && ! $(PY) -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then \
		echo "warning: this machine has an NVIDIA GPU but $(VENV) got a CPU-only torch (a local CPU wheel in pip's find-links?);"; \
		echo "  reinstall it from PyPI, without the local wheels: PIP_FIND_LINKS= PIP_CONFIG_FILE=/dev/null $(PY) -m pip install --force-reinstall -c constraints.txt torch"; \
	fi
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
	rm -rf .pytest_cache .ruff_cache .hypothesis

# every run, sweep and benchmark under logs/, whatever its task_name (logs/.gitkeep stays)
clean-logs:
	find logs -mindepth 1 -maxdepth 1 ! -name .gitkeep -exec rm -rf {} +

FORCE:
