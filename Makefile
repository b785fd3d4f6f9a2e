# The two commands of the README: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed
# The dependency set (every dependency list in pyproject.toml): when it changes, .venv is made
# anew, so a package the project no longer names (e.g. tensorflow-cpu) is not left beside its
# replacement.
DEPS_HASH := $(shell $(PYTHON) scripts/deps_hash.py)

.PHONY: demo test test-fast lint clean

$(STAMP): pyproject.toml
	@if [ -f $(STAMP) ] && [ "$$(cat $(STAMP))" != "$(DEPS_HASH)" ]; then \
		echo "dependencies changed: making $(VENV) anew"; rm -rf $(VENV); fi
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[coreml,dev,export,mobile,openvino,serve,tensorboard,tfds]'
	echo "$(DEPS_HASH)" > $(STAMP)

# ONNX Runtime Web (npm, pinned by web/package-lock.json) for graft serve's /browser/ page and
# its test in Chromium; without npm the page says what is missing and the test is skipped
# (under CI=true it fails).
WEB := web/node_modules/.package-lock.json
$(WEB): web/package-lock.json
	@if command -v npm >/dev/null 2>&1; then cd web && npm ci --no-audit --no-fund --silent; \
	else echo "npm not found: graft serve's /browser/ page will say what is missing"; fi

demo: $(STAMP)
	$(VENV)/bin/graft demo --out demo-run --overwrite

# ruff, the type check (mypy on src/) and the fast tier first (no graft fit, no TFLite
# conversion, no TensorFlow subprocess: about 1.5 minutes on 2 cores), then the integration
# tier (fits, exports, end-to-end runs) on two processes, an idle one taking queued tests from
# the busy one (worksteal), and last the few that time a server against the clock, alone.
test: test-fast
	$(VENV)/bin/python -m pytest -m "integration and not serial" -n 2 --dist worksteal
	$(VENV)/bin/python -m pytest -m "integration and serial"

test-fast: $(STAMP) $(WEB)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/python -m pytest -m "not integration" -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) demo-run .pytest_cache web/node_modules
