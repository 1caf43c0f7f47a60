# The front door. `make demo` and `make test` set everything up themselves (Python 3.11+).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSUMERS := $(VENV)/.installed-consumers
DEMO := demo
SHARD_SIZE ?= 1GiB
NAME ?= aihub-71687
# The CPU build: plain `torch` from PyPI is a CUDA build of several GB.
TORCH ?= torch==2.13.0
# moto asks for the newest boto3, whose botocore s3fs's aiobotocore does not take: pip would try
# every boto3 release before settling (20+ minutes). The one that fits aiobotocore 3.10:
S3_PINS ?= boto3==1.43.117

.PHONY: venv demo test lint shards bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# The consumer libraries the suite opens shards with (Hugging Face, Ray, PyTorch), the S3
# backend and the S3 server the tests start (moto): test only.
$(CONSUMERS): $(STAMP)
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test,train,hf,ray,s3]' 'moto[server]>=5.0' $(S3_PINS)
	touch $(CONSUMERS)

demo: $(STAMP)
	rm -rf $(DEMO)
	$(BIN)/shardify synth $(DEMO)/data
	$(BIN)/shardify convert $(DEMO)/data --out $(DEMO)/shards --shard-size 256KiB
	$(BIN)/shardify verify $(DEMO)/shards --sources $(DEMO)/data
	$(BIN)/shardify report $(DEMO)/shards --html $(DEMO)/report.html

test: $(CONSUMERS)
	$(BIN)/ruff check src tests
	$(BIN)/mypy
	$(BIN)/python -m pytest -n 2 --dist loadfile

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/mypy

# Generates ~2.3 GB of inputs into .bench/ once (about a minute), then ~5 minutes of runs.
bench: $(STAMP)
	$(BIN)/pip install --quiet -e '.[bench,s3,ray]' 'moto[server]>=5.0' $(S3_PINS)
	$(BIN)/python benchmarks/bench.py --cache .bench

# make shards SRC=/data/103.배터리... OUT=/big/shards [NAME=aihub-71687] [SHARD_SIZE=1GiB]
shards: $(STAMP)
	@test -n "$(SRC)" -a -n "$(OUT)" || { echo "usage: make shards SRC=folder OUT=folder [NAME=$(NAME)]"; exit 2; }
	$(BIN)/shardify convert "$(SRC)" --out "$(OUT)" --shard-size $(SHARD_SIZE) --manifest "manifests/$(NAME).parquet"

clean:
	rm -rf $(DEMO) .pytest_cache build
