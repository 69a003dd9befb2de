#!/usr/bin/env bash
# Make sure headless Chromium and its driver from Debian's packages are installed (the browser tests use
# /usr/bin/chromium and /usr/bin/chromedriver; nothing is ever downloaded outside the package manager).
# Idempotent: does nothing when both are there. When they cannot be installed (no apt-get, not root and
# no password-less sudo, no network), it says so and exits 0: the browser tests then skip with that reason.
set -uo pipefail

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "ensure_chromium: apt-get not found; install chromium and its driver by hand (browser tests will skip)" >&2
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  SUDO=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  SUDO="sudo -n"
else
  echo "ensure_chromium: not root and no password-less sudo; run: sudo apt-get install -y chromium chromium-driver" \
       "(browser tests will skip)" >&2
  exit 0
fi
echo "ensure_chromium: installing Debian's chromium and chromium-driver ..." >&2
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get update -q >/dev/null && \
   $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; then
  echo "ensure_chromium: $(/usr/bin/chromium --version 2>/dev/null)" >&2
else
  echo "ensure_chromium: apt-get could not install chromium / chromium-driver (browser tests will skip)" >&2
fi
exit 0
