# Two entry points for a fresh machine (README): `make serve` and `make test`.
# torch is installed first from the pinned CPU wheel so pip never pulls the CUDA build;
# on a GPU host set TORCH="torch --index-url <your CUDA wheel index>" or use Dockerfile.cuda.
# The ray extra is installed too: tests/api/test_ray.py fails without it (CI always runs it).
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
ARGS ?=

.PHONY: install serve demo test lint clean gpu-check

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

install: $(BIN)/.installed

tests/js/node_modules/.installed: tests/js/package.json
	cd tests/js && npm install --no-audit --no-fund --loglevel=error
	touch $@

serve: $(BIN)/.installed
	$(BIN)/k5serve serve $(ARGS)

demo: $(BIN)/.installed
	$(BIN)/k5serve generate "a red fox running through snow" -o demo.mp4 $(ARGS)

# aimlapi-sdk-python vendors its own copy of the `openai` package: kept out of the venv's
# site-packages (it would overwrite the official SDK), run by tests/contracts/test_aimlapi.py in a child process.
$(VENV)/aimlapi-sdk/.installed: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps --target $(VENV)/aimlapi-sdk 'aimlapi-sdk-python>=2.24.0rc1' 'distro>=1.7'
	touch $@

# Debian's Chromium + ChromeDriver for the studio browser tests (CI runs as root on Debian).
/usr/bin/chromedriver:
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null

test: $(BIN)/.installed tests/js/node_modules/.installed /usr/bin/chromedriver $(VENV)/aimlapi-sdk/.installed
	$(BIN)/python -m pytest -n 2 --dist loadfile $(ARGS)

# The prepared GPU check (bench/gpu_check.sh): on a GPU machine, after `bench/gpu_check.sh --fetch-wheels`
# here (wheels the GPU image lacks, carried as .whl/). ARGS="--cpu" runs it on the tiny models instead.
gpu-check:
	bash bench/gpu_check.sh $(ARGS)

lint: $(BIN)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) tests/js/node_modules
