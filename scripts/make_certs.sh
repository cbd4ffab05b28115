#!/usr/bin/env bash
# Make a private CA and a SuperLink server certificate signed by it, for `--runtime flower` with TLS.
#
#   scripts/make_certs.sh DIR [NAME_OR_IP ...]
#
# DIR receives ca.crt / ca.key (the CA: give ca.crt to every SuperNode and to `fedsqueeze run`),
# server.pem / server.key (the SuperLink's certificate and key). The certificate is valid for
# localhost, 127.0.0.1 and every extra NAME_OR_IP given (the SuperLink's host name or address as
# the SuperNodes dial it). Keep ca.key and server.key private.
#
# `fedsqueeze federation` makes the same files itself (with Python's cryptography package) in
# WORKDIR/certs when --tls-dir is not given; --tls-name NAME_OR_IP adds names there.
set -euo pipefail
if [[ $# -lt 1 ]]; then
  echo "usage: $0 DIR [NAME_OR_IP ...]" >&2
  exit 2
fi
dir=$1
shift
mkdir -p "$dir"
cd "$dir"

san="DNS:localhost,IP:127.0.0.1,IP:::1"
for name in "$@"; do
  if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+=",IP:$name"; else san+=",DNS:$name"; fi
done

umask 077
openssl genrsa -out ca.key 2048 2>/dev/null
openssl req -x509 -new -key ca.key -sha256 -days 365 -subj "/CN=fedsqueeze-ca" -out ca.crt
openssl genrsa -out server.key 2048 2>/dev/null
openssl req -new -key server.key -subj "/CN=fedsqueeze-superlink" -out server.csr
cat > server.ext <<EXT
basicConstraints = CA:FALSE
keyUsage = digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = $san
EXT
openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
chmod 644 ca.crt server.pem
echo "wrote $(pwd)/{ca.crt,ca.key,server.pem,server.key} (valid for $san)"
