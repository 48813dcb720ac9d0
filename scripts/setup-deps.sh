#!/usr/bin/env bash
# Installs the Debian packages shardprop builds, tests and trains with.
# Idempotent: packages already present are left alone. Works as root without a TTY,
# or through sudo for a normal user.
set -euo pipefail

packages=(
  build-essential cmake pkg-config
  libopenmpi-dev openmpi-bin
  libtbb-dev libeigen3-dev libhdf5-dev hdf5-tools libopenblas-serial-dev libdnnl-dev
  libgtest-dev libcli11-dev zlib1g-dev
  python3 python3-h5py python3-numpy python3-matplotlib
  dataset-fashion-mnist
  # the fuzz targets (clang with libFuzzer), the multi-host test (network namespaces) and the
  # Slurm test (a controller and node daemon of its own)
  clang libclang-rt-14-dev iproute2 slurm-wlm munge
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "setup-deps: all ${#packages[@]} packages present"
  exit 0
fi

sudo=()
if [ "$(id -u)" -ne 0 ]; then sudo=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
echo "setup-deps: installing ${missing[*]}"
"${sudo[@]}" apt-get update -q
"${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
