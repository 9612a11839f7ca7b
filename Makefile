.PHONY: setup demo test lint bench clean clean-bench test-ceph man

setup:
	@bash scripts/setup.sh

demo: setup
	@bash scripts/demo.sh

# The suite's images and repositories peak near 5 GiB under $TMPDIR (measured with all three
# workers); say so plainly rather than fail somewhere deep in a test with ENOSPC.
# The VM tests boot one guest per module; --dist loadgroup keeps a module's tests (marked
# xdist_group) on one worker. Their guest is built once into /var/cache/vmbak-test-guest.
test: setup
	@avail=$$(df -Pk "$${TMPDIR:-/tmp}" | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$avail" -lt 6 ]; then echo "make test: needs about 6 GiB free in $${TMPDIR:-/tmp}; $$avail GiB free" >&2; exit 1; fi
	.venv/bin/ruff check src tests bench
	.venv/bin/python -m pytest -q -n 3 --dist loadgroup --maxfail=10 --durations=15 --ignore=tests/ceph

# The manual page vmbak(1), generated from the command-line parser: man -l build/vmbak.1
man: setup
	@mkdir -p build
	.venv/bin/vmbak man > build/vmbak.1.tmp && mv build/vmbak.1.tmp build/vmbak.1

lint: setup
	.venv/bin/ruff check src tests bench

bench: setup
	@VMBAK_BENCH_DEPS=1 bash scripts/setup.sh
	.venv/bin/python bench/bench_foundation.py

# The S3 tests against Ceph radosgw instead of moto, and the RBD tests (tests/ceph), on one
# single-node cluster (Debian's packages, started by scripts/ceph-rgw.sh). Not part of
# `make test`: it installs and starts Ceph (40-65 s to start; the RBD tests take 2-6
# minutes on the shared 2-core machine); .ci/run runs it after `make test`. Without `make
# test-ceph`, tests/ceph starts its own cluster (fixture).
test-ceph: setup
	@bash scripts/ceph-rgw.sh start
	. /tmp/vmbak-ceph/env && .venv/bin/python -m pytest tests/s3 tests/ceph -q -n 2 --dist loadgroup; status=$$?; bash scripts/ceph-rgw.sh stop; exit $$status

clean:
	rm -rf .venv build dist *.egg-info .pytest_cache

# Benchmarks keep their images (reused between runs) and repositories under bench/work: tens of GiB.
clean-bench:
	rm -rf bench/work
