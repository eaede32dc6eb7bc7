# fxopt developer commands. `make demo` and `make test` set everything up on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fxopt-installed
PYTEST := $(PY) -m pytest
# -n 2: the CI machine has two cores
XDIST := -n 2 -p xdist

.PHONY: venv demo test zoo fuzz slow bench bench-prune bench-quant bench-distill lint wheel-check clean

venv: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install -e '.[dev]' -c requirements-dev.txt
	touch $(STAMP)

demo: venv
	$(PY) -m fxopt.demo --out out/

test: venv host-tools browser-tools
	HYPOTHESIS_PROFILE=$${HYPOTHESIS_PROFILE:-ci} $(PYTEST) $(XDIST) -m "not zoo and not slow and not fuzz and not tensorrt" tests

# qemu-user runs ONNX Runtime on an emulated AVX2-only CPU, so the int8 files for hosts without VNNI are
# checked on any x86 host (tests/passes/test_quantize.py). Best effort: without apt (as root or sudo) that one test is skipped.
.PHONY: host-tools
host-tools:
	@command -v qemu-x86_64 >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq qemu-user) >/dev/null 2>&1 \
	  || echo "note: qemu-user is not installed (apt as root or sudo): the emulated-AVX2 int8 test is skipped"; }

# Debian's chromium renders the pipeline's HTML report headless (tests/automation/test_report_browser.py,
# marker `browser`). Best effort, like host-tools: without apt (as root or sudo) that test is skipped.
.PHONY: browser-tools
browser-tools:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo "sudo -n" ); \
	  ($$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium) >/dev/null 2>&1 \
	  || echo "note: chromium is not installed (apt as root or sudo): the HTML report browser test is skipped"; }

zoo: venv
	$(PYTEST) -m zoo tests/zoo -v

fuzz: venv
	HYPOTHESIS_PROFILE=deep $(PYTEST) $(XDIST) -m "fuzz or not (zoo or slow or tensorrt)" tests

slow: venv
	$(PYTEST) -m slow tests

bench: venv
	$(PY) bench/compile_time.py

bench-prune: venv
	$(PY) bench/prune.py
	$(PY) bench/prune_digits.py

# peers (NNCF, ModelOpt's ONNX PTQ) come from the `bench` extra; a peer that fails is a table row
bench-quant: venv
	$(PY) -m pip install -e '.[dev,bench]' -c requirements-dev.txt
	$(PY) bench/quantize.py

# the bundled perception models trained with their recipes, int8 for xavier vs fp32 in ONNX Runtime (~10 CPU min)
.PHONY: bench-quant-models
bench-quant-models: venv
	$(PY) bench/quantize_models.py

# labels only vs logit KD vs ICKD after pruning the digits CNN to 20% of its FLOPs, the sweep that explains it, and
# camera_multitask (every part: 30-55 min on 2 cores; `python bench/distill.py --parts main` alone: about 3 min)
bench-distill: venv
	$(PY) bench/distill.py

# NAS-slimming vs uniform latency pruning on camera_multitask (default and md) and pointpillars, then int8, 3 fine-tune seeds (bench/results/slim.md; about 70 min on 2 cores)
.PHONY: bench-slim
bench-slim: venv
	$(PY) bench/slim.py

# pointpillars' md preset: widths down to 0.125 (its floor is then 0.497x, the pillar net and scatter pruned too), about 60 min on 2 cores
.PHONY: bench-slim-pointpillars-md
bench-slim-pointpillars-md: venv
	$(PY) bench/slim.py --models pointpillars:md --widths 0.125 0.1875 0.25 0.375 0.5 0.625 0.75 0.875 1 --no-hd --out bench/results/slim_pointpillars_md.md

# QAT vs PTQ vs fp32 on the bundled perception models, 3 seeds, the deployed int8 file in ONNX Runtime (bench/results/qat_ptq.md; about 23 min on 2 cores)
.PHONY: bench-qat
bench-qat: venv
	$(PY) bench/qat_ptq.py

# fit the xavier latency model to published AGX Xavier TensorRT figures, checked on held-out families (bench/results/xavier_latency.md)
.PHONY: bench-latency
bench-latency: venv
	$(PY) bench/xavier_latency.py

lint: venv
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info out
