# fastelbo: `make demo` and `make test` each work on a fresh machine with only Python: they create
# .venv, install torch and the other dependencies, and build the extension; a second run skips
# what is already done (stamp files in .venv).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.14.1
DEPS := torch==$(TORCH_VERSION) pybind11 ninja setuptools wheel numpy pytest pytest-benchmark matplotlib scikit-learn tqdm
DEPS_STAMP := $(VENV)/.fastelbo-deps
BUILD_STAMP := $(VENV)/.fastelbo-build
SOURCES := $(shell find csrc -name '*.cpp' -o -name '*.cu' -o -name '*.h' -o -name '*.cuh') setup.py pyproject.toml
PYTEST_ARGS ?=

.PHONY: install test demo validate bench clean

install: $(BUILD_STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch 2.14.1 is a CUDA build: with its nvidia-* and triton wheels the venv takes about 6 GB.
# Say so before pip starts, because pip's own "No space left on device" names no size.
VENV_NEEDS_KB := 6500000

$(DEPS_STAMP): $(PY)
	@free_kb=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt $(VENV_NEEDS_KB) ]; then \
	  echo "fastelbo: warning: $$((free_kb / 1024)) MiB free for $(VENV); installing torch and the other" \
	       "dependencies needs about $$(($(VENV_NEEDS_KB) / 1024)) MiB, so pip may run out of space." >&2; \
	fi
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(DEPS)
	echo '$(DEPS)' > $@

# --no-build-isolation: build against the torch installed above, not a second one in a build env.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

# A stamp's date cannot tell that its step must be redone: the dependency list changed (a new
# TORCH_VERSION, a new package; the deps stamp holds the list it installed), or the built
# extension is gone (make clean, a deleted .so) while the sources are older than the build stamp.
ifneq ($(file < $(DEPS_STAMP)),$(DEPS))
.PHONY: $(DEPS_STAMP)
endif
ifeq ($(wildcard fastelbo/_C*.so),)
.PHONY: $(BUILD_STAMP)
endif

test: install
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/fastelbo demo

validate: install
	$(VENV)/bin/fastelbo validate

bench: install
	$(VENV)/bin/fastelbo bench --quick

clean:
	rm -rf build *.egg-info fastelbo/*.so $(BUILD_STAMP)
