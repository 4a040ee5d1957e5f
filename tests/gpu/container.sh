#!/bin/sh
# Stand in for a container runtime: run COMMAND as UID with a private /dev/shm and the
# Allocate response's mounts bind-mounted at their container paths.
# Meant to run inside fresh namespaces: unshare -m -i -n -u -p -f --mount-proc container.sh ...
#   container.sh UID [HOST_PATH:CONTAINER_PATH:ro|rw ...] -- COMMAND [ARG...]
set -eu
uid=$1
shift
mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm
while [ "$1" != "--" ]; do
    host=${1%%:*}
    rest=${1#*:}
    target=${rest%:*}
    mode=${rest##*:}
    shift
    mkdir -p "$target"
    mount --bind "$host" "$target"
    if [ "$mode" = ro ]; then mount -o remount,bind,ro "$target"; fi
done
shift
if [ "$uid" != 0 ]; then
    exec setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@"
fi
exec "$@"
