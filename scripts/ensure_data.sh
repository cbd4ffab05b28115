#!/usr/bin/env bash
# Make sure the bundled datasets (Debian packages) are installed; install them when running as root.
set -euo pipefail
need=()
[ -f /usr/share/wordnet/data.noun ] || need+=(wordnet-base)
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || need+=(dataset-fashion-mnist)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then
  echo "installing Debian data packages: ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null; }
else
  echo "fedsqueeze needs the Debian packages: ${need[*]}" >&2
  echo "install them with:  sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
