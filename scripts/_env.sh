# Sourced by scripts/demo and scripts/test: create .venv if missing and install the project.
# Idempotent: a stamp file records the hash of what was installed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
extra="${NEUROTASK_EXTRAS:-}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[neurotask] creating $VENV"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.neurotask-installed${extra:+-$extra}"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[neurotask] installing the project into $VENV (first time takes a few minutes)"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  target="$ROOT"
  [ -n "$extra" ] && target="$ROOT[$extra]"
  "$VENV/bin/python" -m pip install --quiet -c "$ROOT/constraints.txt" -e "$target"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
