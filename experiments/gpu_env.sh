# Sourced (not run) by the GPU scripts, from the repository root, after PY is set:
#   - prints the torch / Lightning / timm versions and the GPU;
#   - Hydra and OmegaConf from the wheels in .whl/ (experiments/gpu_wheels.sh) when the image lacks them;
#   - gpu_data_root: prints the CIFAR-10 root: CIFAR10_ROOT, else .data/cifar10.tar.gz (experiments/gpu_pack_data.sh)
#     unpacked to /tmp/sdq_data, else nothing.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! "$PY" -c "import hydra, omegaconf" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import torch, lightning, timm; print('torch', torch.__version__, 'lightning', lightning.__version__, 'timm', \
  timm.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"

gpu_data_root() {
  if [[ -n "${CIFAR10_ROOT:-}" ]]; then echo "$CIFAR10_ROOT"; return; fi
  if [[ -f .data/cifar10.tar.gz ]]; then
    [[ -d /tmp/sdq_data/cifar10 ]] || { mkdir -p /tmp/sdq_data && tar -xzf .data/cifar10.tar.gz -C /tmp/sdq_data; } \
      && echo /tmp/sdq_data/cifar10
  fi
}
