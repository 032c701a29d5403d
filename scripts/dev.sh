#!/usr/bin/env bash
# Runs a command inside the project's virtual environment, creating or updating it first
# (the install is redone only when pyproject.toml changes).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.installed-$(sha256sum "$root/pyproject.toml" | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "Setting up $venv (one time, a few minutes)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install --quiet --upgrade pip
  "$venv/bin/python" -m pip install --quiet -e "$root[test]"
  rm -f "$venv"/.installed-*
  touch "$stamp"
fi
cd "$root"
export PATH="$venv/bin:$PATH"
exec "$@"
