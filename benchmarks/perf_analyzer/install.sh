#!/usr/bin/env bash
# Installs perf_analyzer for this machine into a tools directory (default .tools/perf_analyzer)
# and writes a wrapper <dir>/perf_analyzer that sets its library path. Idempotent.
#
#   glibc >= 2.38 (Ubuntu 24.04, the H200 machine): perf-analyzer 2.60 from PyPI.
#   older glibc (Debian 12, CI): the binary shipped in the tritonclient 2.41.0 wheel, which
#   needs Debian's libb64-0d and libcudart.so.12 (PyPI nvidia-cuda-runtime-cu12) even on a
#   machine without a GPU.
#
# Usage: benchmarks/perf_analyzer/install.sh [DIR]      (PYTHON=... selects the pip to use)
set -euo pipefail
DIR=${1:-.tools/perf_analyzer}
PYTHON=${PYTHON:-python3}
mkdir -p "$DIR"
DIR=$(cd "$DIR" && pwd)
WRAPPER="$DIR/perf_analyzer"
if [ -x "$WRAPPER" ] && "$WRAPPER" --version >/dev/null 2>&1; then
  echo "perf_analyzer already installed: $WRAPPER"; exit 0
fi

glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null | awk '{print $2}')   # e.g. 2.36
glibc_minor=${glibc#*.}
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT

if [ "${glibc_minor:-0}" -ge 38 ]; then
  "$PYTHON" -m pip install -q --target "$DIR/pa260" perf-analyzer==2.60.0
  BIN=$(find "$DIR/pa260" -type f -name perf_analyzer -perm -u+x | head -1)
  LIBS=""
else
  if ! ldconfig -p | grep -q 'libb64.so.0d'; then
    if [ "$(id -u)" = 0 ]; then
      apt-get install -y -q libb64-0d >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q libb64-0d >/dev/null; }
    elif command -v sudo >/dev/null; then
      sudo apt-get install -y -q libb64-0d >/dev/null
    else
      echo "perf_analyzer needs libb64.so.0d: apt-get install libb64-0d (as root)" >&2; exit 1
    fi
  fi
  "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --platform manylinux1_x86_64 \
      --python-version 3 --implementation py -d "$TMP" tritonclient==2.41.0
  "$PYTHON" - "$TMP" "$DIR" <<'PY'
import glob, os, sys, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "tritonclient-2.41.0-*.whl"))[0]
member = "tritonclient-2.41.0.data/data/bin/perf_analyzer"
with zipfile.ZipFile(wheel) as z, open(os.path.join(out, "perf_analyzer.bin"), "wb") as f:
    f.write(z.read(member))
os.chmod(os.path.join(out, "perf_analyzer.bin"), 0o755)
PY
  "$PYTHON" -m pip install -q --no-deps --target "$DIR/cudart" nvidia-cuda-runtime-cu12
  BIN="$DIR/perf_analyzer.bin"
  LIBS=$(dirname "$(find "$DIR/cudart" -name 'libcudart.so.12*' | head -1)")
fi

cat > "$WRAPPER" <<EOS
#!/usr/bin/env bash
# perf_analyzer with the libraries it needs (written by benchmarks/perf_analyzer/install.sh)
export LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$BIN" "\$@"
EOS
chmod +x "$WRAPPER"
"$WRAPPER" --version >/dev/null 2>&1 || { echo "perf_analyzer does not run:" >&2; "$WRAPPER" --version 2>&1 | tail -3 >&2; exit 1; }
echo "perf_analyzer installed: $WRAPPER"
