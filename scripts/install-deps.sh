#!/usr/bin/env bash
# Installs the system packages natpunch needs (Debian/Ubuntu), only those that are missing.
# Sourced by ./run and ./test; safe to run on its own.
set -euo pipefail

# miniupnpd-nftables before miniupnpd: it satisfies miniupnpd's backend dependency the way
# Debian recommends (nftables, not iptables).
# postgresql: the measurement store's second backend; tests and `bench server` run private
# servers of their own, so the package's service is not started at install.
packages=(iproute2 nftables iptables conntrack procps coturn miniupnpd-nftables miniupnpd postgresql)
# The test suite also opens the campaign's HTML report in headless Chromium, talks to the
# daemon's API from a Python client written from the spec, and logs in with OpenSSH through
# `natpunch connect --fdpass`.
if [[ ${NATPUNCH_TEST_DEPS:-} == 1 ]]; then
  packages+=(chromium python3 openssh-server openssh-client)
fi

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "natpunch needs these packages: ${missing[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  # Packages must not start their services (miniupnpd, coturn, PostgreSQL): natpunch runs its
  # own instances. policy-rc.d answering 101 is Debian's way to say so.
  policy=""
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' >"$policy"
    chmod +x "$policy"
  fi
  apt-get update -qq
  status=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || status=$?
  [[ -n $policy ]] && rm -f "$policy"
  if ((status)); then
    echo "apt-get install failed ($status)" >&2
    exit "$status"
  fi
fi

if ! command -v cargo >/dev/null 2>&1; then
  for d in "$HOME/.cargo/bin" /usr/local/cargo/bin; do
    [[ -x $d/cargo ]] && export PATH="$d:$PATH"
  done
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "natpunch needs a Rust toolchain (cargo 1.90 or newer): install it with rustup" >&2
  exit 1
fi
