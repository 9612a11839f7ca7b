.PHONY: setup demo test lint bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

test: setup
	.venv/bin/ruff check src tests bench
	.venv/bin/python -m pytest -q -n 3 --maxfail=10 --durations=15

lint: setup
	.venv/bin/ruff check src tests bench

bench: setup
	@VMBAK_BENCH_DEPS=1 bash scripts/setup.sh
	.venv/bin/python bench/bench_foundation.py

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
