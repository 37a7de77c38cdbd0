#!/bin/sh
# Build guest programs into the cache (the test session does this on demand; this is for
# looking at a guest by hand: objdump -d "$(guests/build.sh smoke)").
# Usage: guests/build.sh [program...]   (default: every guests/*.c)
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
[ -x "$py" ] || py=python3
exec "$py" -m kvmpy.guest "$@"
