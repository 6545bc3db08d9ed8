# The README's two commands: `make demo` and `make test`.
# Each creates the virtual environment from requirements*.txt when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.radnet-installed
NATIVE := radnet/native/build/onednn_conv3d.so

.PHONY: test demo venv clean-demo

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# oneDNN's 3D convolutions for the CPU (radnet/native). Where they cannot be built
# (no C++ compiler, not x86-64 Linux) radnet runs XLA's own convolutions: slower, same numbers.
$(NATIVE): radnet/native/onednn_conv3d.cc $(STAMP)
	-$(PY) -m radnet.native

venv: $(STAMP) $(NATIVE)

test: venv
	JAX_PLATFORMS=cpu $(PY) -m pytest -q --durations=15 tests

demo: venv
	PYTHON=$(PY) bash launch/demo.sh

clean-demo:
	rm -rf runs/demo
