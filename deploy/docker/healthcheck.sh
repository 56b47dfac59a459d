#!/bin/bash
# meshnode-healthcheck [ADMIN_ADDR]: exit 0 when the node's admin API answers GET /readyz with 200
# (registered and every listener bound), 1 otherwise. Installed in the image as
# /usr/local/bin/meshnode-healthcheck; needs only bash (no curl in the image).
addr=${1:-${MESHNODE_ADMIN:-127.0.0.1:15000}}
host=${addr%:*} port=${addr##*:}
exec 3<>"/dev/tcp/$host/$port" || exit 1
printf 'GET /readyz HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n' "$addr" >&3 || exit 1
IFS= read -r -t 3 status <&3 || exit 1
[[ $status == "HTTP/1."[01]" 200"* ]] || { echo "readyz: ${status%$'\r'}"; exit 1; }
