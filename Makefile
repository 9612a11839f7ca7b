.PHONY: setup demo test lint bench clean test-ceph

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

# The S3 tests against Ceph radosgw (Debian's packages, a single-node cluster started by
# scripts/ceph-rgw.sh) instead of moto. Not part of CI: it installs and starts Ceph.
test-ceph: setup
	@bash scripts/ceph-rgw.sh start
	. /tmp/vmbak-ceph/env && .venv/bin/python -m pytest tests/s3 -q; status=$$?; bash scripts/ceph-rgw.sh stop; exit $$status

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache
