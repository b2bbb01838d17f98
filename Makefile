# ditkit: set-up, the main job on the embedded default, tests, benchmarks.
# `make demo` and `make test` each do their own set-up (a virtual environment in .venv).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= out

.PHONY: setup demo test test-all bench bench-cuda wheels-cuda clean tiny-digits tiny-digits-text cli-docs

setup: $(VENV)/.installed

# On a machine without an NVIDIA driver, install the CPU build of torch first (a local wheel here);
# pyproject's range (torch>=2.4,<3) then accepts it instead of pulling several GB of CUDA packages.
$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	if ! command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/python -m pip install -q "torch==2.13.0"; fi
	$(BIN)/python -m pip install -q -e ".[dev,peers]"  # peers: bench --peer (torchao, optimum-quanto), tested in CI
	$(BIN)/python -m pip install -q --no-deps "torch-fidelity>=0.3,<0.5"  # see pyproject.toml: not torchvision
	touch $@

# The main job on the embedded default model: a grid of every digit, scored by its judge, its info, then the
# whole chain in its quick setting (prune -> distill -> quantize/export, a LoRA, a gated bench; a few minutes).
demo: setup
	$(BIN)/ditkit generate tiny-digits -o $(OUT)/demo --labels 0,1,2,3,4,5,6,7,8,9 --num-images 20 --seed 0 --force
	$(BIN)/ditkit info tiny-digits
	$(MAKE) -C docs/examples/pipeline OUT=$(abspath $(OUT))/pipeline VENV=$(abspath $(BIN))/

test: setup
	$(BIN)/python -m pytest -q -m "not slow and not gpu"

test-all: setup
	$(BIN)/python -m pytest -q

# Rebuild the embedded default from scratch (about 10-15 minutes on 2 CPU cores).
tiny-digits: setup
	$(BIN)/python tools/tiny_digits.py --out formats/assets/tiny-digits

# Rebuild the text-conditioned default (a PixArt pipeline, prompts like "a handwritten seven"); it reuses
# tiny-digits' VAE and judge, so build that first (see docs/tiny-digits-text.md for the time it takes).
tiny-digits-text: setup
	$(BIN)/python tools/tiny_digits_text.py --out formats/assets/tiny-digits-text

# Regenerate docs/benchmarks.md: writes full-size random-weight architectures and every variant into
# $(OUT)/bench-archs (about 12 GB), then runs each `ditkit bench` the page quotes (about 30 minutes on 2 cores).
bench: setup
	$(BIN)/python docs/benchmarks.py --cache $(OUT)/bench-archs

# The one-shot CUDA run (docs/cuda.md), on a GPU machine with torch: installs ditkit and what the machine lacks
# from the wheels in .whl/ (fill it first, here, with `make wheels-cuda`), runs `pytest -m gpu`, benches DiT-XL/2
# and PixArt-alpha 1024px in bf16 and their variants, and writes tables into $(OUT); 8 minutes at most.
# `make bench-cuda ARGS=--dry-run` prints the steps and their time budgets (any machine).
bench-cuda:
	$(PYTHON) tools/bench_cuda.py --out $(OUT) $(ARGS)

# The wheels bench-cuda installs (diffusers, bitsandbytes with only its CUDA 13 libraries, torch-pruning, gguf,
# ditkit's own), downloaded into .whl/ (git-ignored); prints their sizes against the 64 MiB that travels.
wheels-cuda: setup
	$(BIN)/python tools/bench_cuda.py --make-wheels .whl

# Regenerate docs/cli-reference.md from --help (CI checks it is current).
cli-docs: setup
	$(BIN)/python -m ditkit.cli.reference > docs/cli-reference.md

clean:
	rm -rf $(OUT) .pytest_cache
