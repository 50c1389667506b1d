#!/usr/bin/env bash
# Installs what lithops-hpc needs to build, test and run on Debian 12 (root).
# Build: compiler, meson, the libraries. Run: Open MPI, Slurm clients, munge,
# RabbitMQ (for a local broker), Redis (the storage `lithops-hpc up` starts),
# Python with pika, redis and yaml for the tests, clang and its
# libFuzzer runtime for the fuzz suite (tests/fuzz/).
set -euo pipefail
packages=(
  meson ninja-build pkg-config g++ cmake scdoc man-db
  libopenmpi-dev openmpi-bin librabbitmq-dev libtomlplusplus-dev libyaml-cpp-dev libspdlog-dev
  doctest-dev libslurm-dev libcli11-dev nlohmann-json3-dev libxxhash-dev
  slurm-wlm munge rabbitmq-server redis-server iproute2 procps util-linux
  python3 python3-pika python3-redis python3-yaml
  clang libclang-rt-14-dev clang-format universal-ctags
)
if [ "$(id -u)" -ne 0 ]; then
  echo "install-deps.sh: run as root (or with sudo): it calls apt-get" >&2
  exit 2
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps.sh: all ${#packages[@]} packages present"
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"
