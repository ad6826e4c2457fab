# Sourced by the bench/gpu*.sh scripts, from the repository root on the GPU machine: installs the wheels
# carried in .whl/ (built on the CPU machine by ../shared/gpu/wheels.sh) and points PYTHONPATH at them and the
# source tree, which is not pip-installed there.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "error: installing .whl/*.whl failed"; exit 2; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "warning: no .whl/ beside the source tree: deepspeed will be missing (see ../shared/gpu/README.md)"
  export PYTHONPATH=$PWD
fi
export TORCH_CUDA_ARCH_LIST=9.0 PYTHONUNBUFFERED=1  # 9.0: DeepSpeed's op builder cannot parse '9.0a'
