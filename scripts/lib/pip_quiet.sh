# Sourced by the environment scripts: pip_quiet ARGS... runs "$venv/bin/python -m pip ARGS..." without the noise
# of this machine's pip config (it lists local index folders that lack most packages), keeping pip's exit status.
pip_quiet() {
    "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
    return "${PIPESTATUS[0]}"
}
