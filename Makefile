# aegis: build, test, lint and demo. `make setup` installs what the tests run for real
# (redis-server, PostgreSQL, Envoy in .venv); `make test` and `make demo` run it first.

CARGO      ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
AEGIS_BIN  := $(TARGET_DIR)/debug/aegis
SANDBOX_BIN := $(TARGET_DIR)/debug/sandbox

.PHONY: setup build test demo lint fmt bench soak fuzz fuzz-smoke fuzz-tool

# Fuzz targets (fuzz/, its own crate): libFuzzer needs nightly flags; RUSTC_BOOTSTRAP lets the
# stable toolchain take them. `make test` runs the same invariants in-process on the stable
# toolchain (tests/fuzz_smoke.rs, a few seconds a target), since the sanitizer build of the
# targets alone takes 10+ minutes on a 2-core machine. FUZZ_SECS per target: 20 in
# `make fuzz-smoke`, 600 in `make fuzz`.
FUZZ_TARGETS := bearer_token normalize_path validate_token config_parse sql_classify
FUZZ_SECS    ?= 20

setup:
	@bash scripts/bootstrap.sh

build:
	$(CARGO) build --workspace

test: setup
	$(CARGO) test --workspace

# The 10-minute soak (`make test` runs the same test for 60 s).
soak: setup
	AEGIS_SOAK_SECS=600 $(CARGO) test -p aegis --test soak -- --nocapture

fuzz-tool:
	@command -v cargo-fuzz >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --locked

fuzz-smoke: fuzz-tool
	cd fuzz && for t in $(FUZZ_TARGETS); do \
	  mkdir -p corpus/$$t && \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run $$t corpus/$$t -- \
	    -max_total_time=$(FUZZ_SECS) -rss_limit_mb=2048 -max_len=20000 || exit 1; \
	done

fuzz:
	$(MAKE) fuzz-smoke FUZZ_SECS=600

demo: setup build
	$(SANDBOX_BIN) demo --aegis-bin $(AEGIS_BIN)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all

# Benchmarks (not part of `test`): the audit chain against a durable PostgreSQL, then the Check
# suite with its floors (bench/src/bin/check-bench.rs). Results: bench-results/*.json; see
# BENCHMARKS.md. Each run stops by itself; BENCH_SECS sets the length of each measured run.
bench: setup
	$(CARGO) build --release -p aegis -p bench
	$(CARGO) run --release -p bench --bin audit-bench
	$(CARGO) run --release -p bench --bin broker-bench
	AEGIS_BIN=$(TARGET_DIR)/release/aegis $(CARGO) run --release -p bench --bin check-bench
