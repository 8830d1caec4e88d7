# aegis: build, test, lint and demo. `make setup` installs what the tests run for real
# (redis-server, PostgreSQL, Envoy in .venv); `make test` and `make demo` run it first.

CARGO      ?= cargo
TARGET_DIR ?= $(or $(CARGO_TARGET_DIR),target)
AEGIS_BIN  := $(TARGET_DIR)/debug/aegis
SANDBOX_BIN := $(TARGET_DIR)/debug/sandbox

.PHONY: setup build test demo lint fmt

setup:
	@bash scripts/bootstrap.sh

build:
	$(CARGO) build --workspace

test: setup
	$(CARGO) test --workspace

demo: setup build
	$(SANDBOX_BIN) demo --aegis-bin $(AEGIS_BIN)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt:
	$(CARGO) fmt --all
