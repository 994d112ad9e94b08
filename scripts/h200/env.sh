# Sourced at the start of a command on the lent H200 (the `device` tool), from the project root:
#   export IMG_PY=$(command -v python3) && source scripts/h200/env.sh && ...
# IMG_PY keeps the image's own python3 (numpy 2) for vLLM's process (--vllm-python "$IMG_PY").
# A call that carries .device/ (../shared/device/make-bundle.sh --no-perf-analyzer: the tracked
# tree plus the bundle must stay under the 64 MiB a call carries) sets the machine up; a later
# call on the same warm machine carries nothing and only re-exports what setup.sh exported.
if [ -f .device/setup.sh ]; then
  source .device/setup.sh >/dev/null || echo "scripts/h200/env.sh: .device/setup.sh failed" >&2
elif [ -x /opt/triton-venv/bin/python3 ]; then
  export PATH=/opt/triton-venv/bin:$PATH
  export LD_LIBRARY_PATH=/opt/tritonserver/lib:$(python3 -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
else
  echo "scripts/h200/env.sh: a fresh machine: carry .device in this call" >&2
fi
# slora_kernels is the folder kernels/ (pyproject's package-dir): an editable install maps it.
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -n 1
