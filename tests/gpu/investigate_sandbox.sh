#!/bin/bash
# Does the real MPS control daemon work inside vgpu-mps@.service's sandbox once it loses
# CAP_SYS_PTRACE and runs as a group of its own (issue 20)? The lent GPU machines have no
# systemd, so the sandbox is rebuilt by hand around `nvidia-cuda-mps-control -f -M`:
#   - /proc mounted with hidepid=invisible (ProtectProc=invisible; not subset=pid: CUDA
#     reads /proc/driver/nvidia, /proc/devices, /proc/cpuinfo, /proc/sys),
#   - a group other than root (procfs shows every process to group 0 whatever hidepid
#     says, so a check as group root shows nothing),
#   - the unit's capability bounding set without CAP_SYS_PTRACE and CAP_SYS_MODULE,
#     NoNewPrivileges, a private network namespace, /run an empty read-only tmpfs and
#     /root empty and read-only (ProtectHome=yes: CUDA's JIT cache cannot be made),
# then: a server before any client, a uid-1000 and a root client under the daemon's
# memory default, get_client_list, terminate_client on a running client, and what the
# daemon's credentials can see of other processes. With STRACE=<strace binary> the daemon
# and its servers are traced for signals and ptrace (the earlier trace did not record
# ptrace and covered no terminate_client).
# Run as root on a machine with an NVIDIA GPU and python3 with torch. Changes no GPU
# setting: the daemon lives under /tmp and is quit on exit.
#   tests/gpu/investigate_sandbox.sh [LOGFILE]
#   CTL=<control program> SKIP_CLIENTS=1   the plumbing alone (e.g. with the stand-in daemon)
set -u
LOG=${1:-/dev/stdout}
exec >"$LOG" 2>&1
ROOT=/tmp/vgpu-sandbox
rm -rf "$ROOT"; mkdir -p "$ROOT"; chmod 755 "$ROOT"
CTL=${CTL:-$(command -v nvidia-cuda-mps-control)}
UUID=${UUID:-$(nvidia-smi --query-gpu=uuid --format=csv,noheader 2>/dev/null | head -1)}
UUID=${UUID:-GPU-00000000-0000-0000-0000-000000000001}
PIPE=$ROOT/pipe/$UUID
LOGD=$ROOT/log/$UUID
DAEMON_GID=${DAEMON_GID:-64999}
STRACE=${STRACE:-}
PYBIN=$(command -v python3)
DAEMON_PID=
SERVERS=()
CLIENTS=()
# vgpu-mps@.service's CapabilityBoundingSet=~..., with CAP_SYS_PTRACE and CAP_SYS_MODULE.
DROPPED=-net_admin,-net_bind_service,-net_broadcast,-net_raw,-audit_control,-audit_read
DROPPED+=,-audit_write,-mac_admin,-mac_override,-sys_time,-wake_alarm,-sys_boot
DROPPED+=,-sys_tty_config,-sys_pacct,-linux_immutable,-bpf,-block_suspend,-lease,-syslog
DROPPED+=,-sys_chroot,-sys_ptrace,-sys_module
# As the daemon's own process is: uid 0, the group above, the bounding set above.
AS_DAEMON=(setpriv --regid "$DAEMON_GID" --clear-groups --bounding-set "$DROPPED"
  --inh-caps=-all --no-new-privs)

step() { echo; echo "=== $(date +%T.%N | cut -c1-12) $*"; }
ctl() { echo "$*" | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 10 "$CTL"; echo "[rc=$?]"; }
remember_servers() {
  for pid in $(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL" 2>/dev/null); do
    SERVERS+=("$pid")
  done
}
stop_daemon() {
  [ -z "$DAEMON_PID" ] && return
  remember_servers
  ctl quit; for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; DAEMON_PID=
}
cleanup() {
  step cleanup
  for pid in "${CLIENTS[@]}"; do kill -9 "$pid" 2>/dev/null; done
  stop_daemon; sleep 1
  for pid in "${SERVERS[@]}"; do
    kill -0 "$pid" 2>/dev/null && { echo "killing our leftover server $pid"; kill -9 "$pid"; }
  done
}
trap cleanup EXIT

# The sandbox: a mount and network namespace of its own, the mounts above, then the
# daemon (traced when STRACE is set) with the daemon's credentials.
mkdir -p "$PIPE" "$LOGD"; chmod 755 "$ROOT/pipe" "$PIPE" "$ROOT/log" "$LOGD"
cat >"$ROOT/enter.sh" <<'EOF'
set -e
mount --make-rprivate /
mount -t proc -o hidepid=invisible proc /proc
mount -t tmpfs -o ro,mode=0755 tmpfs /run
mount -t tmpfs -o ro,mode=0000 tmpfs /root
exec "$@"
EOF
step "A. the daemon in the sandbox (gid $DAEMON_GID, no CAP_SYS_PTRACE, hidepid=invisible)"
TRACE=()
[ -n "$STRACE" ] && TRACE=("$STRACE" -f -qq -o "$ROOT/trace" -e trace=%process,kill,tgkill,tkill,ptrace,process_vm_readv,pidfd_open,pidfd_send_signal,setuid,setgid,setresuid,setresgid,setgroups,capset,prctl)
(CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_MPS_LOG_DIRECTORY=$LOGD \
  exec unshare -m -n -- sh "$ROOT/enter.sh" "${TRACE[@]}" "${AS_DAEMON[@]}" "$CTL" -f -M \
  >>"$ROOT/daemon.out" 2>&1) &
DAEMON_PID=$!
for _ in $(seq 200); do
  echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 2 "$CTL" >/dev/null 2>&1 && break
  sleep 0.05
done
CONTROL_PID=$(cat "$PIPE/nvidia-cuda-mps-control.pid" 2>/dev/null)
echo "daemon pid (from its pid file): ${CONTROL_PID:-none}"
[ -n "$CONTROL_PID" ] && grep -E '^(Uid|Gid|Groups|CapBnd|CapEff|NoNewPrivs)' "/proc/$CONTROL_PID/status"

step "B. what the daemon's credentials see of other processes (from inside its namespaces)"
if [ -n "$CONTROL_PID" ]; then
  nsenter -t "$CONTROL_PID" -m -n -- "${AS_DAEMON[@]}" sh -c '
    echo "processes visible: $(ls /proc | grep -c "^[0-9]")"
    head -c 30 /proc/1/environ >/dev/null 2>&1 && echo "/proc/1/environ: READ" || echo "/proc/1/environ: refused"
    ls /proc/1/root/ >/dev/null 2>&1 && echo "/proc/1/root: REACHED" || echo "/proc/1/root: refused"
    kill -0 1 2>/dev/null && echo "signal PID 1: allowed" || echo "signal PID 1: refused"'
fi

step "C. a server before any client, under a 4096M memory default"
ctl set_default_device_pinned_mem_limit 0 4096M
ctl set_default_active_thread_percentage 12.5
ctl start_server -uid 0; sleep 2
SERVER=$(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL" | head -1)
echo "server ${SERVER:-none}"
[ -n "$SERVER" ] && grep -E '^(Uid|Gid|CapBnd)' "/proc/$SERVER/status"
tail -n 5 "$ROOT/daemon.out"

if [ "${SKIP_CLIENTS:-0}" != 1 ]; then
cat >"$ROOT/mem.py" <<'EOF'
import json, torch
free, total = torch.cuda.mem_get_info()
print(json.dumps({"free_mib": free >> 20, "sms": torch.cuda.get_device_properties(0).multi_processor_count}))
EOF
cat >"$ROOT/loop.py" <<'EOF'
import os, sys, time, torch
a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
print(f"pid {os.getpid()} running", flush=True)
end = time.time() + float(sys.argv[1])
try:
    while time.time() < end:
        a @ a; torch.cuda.synchronize()
    print("finished", flush=True)
except Exception as exc:
    print(f"error: {exc}", flush=True)
EOF
chmod 644 "$ROOT/mem.py" "$ROOT/loop.py"
as_client() { HOME=/tmp CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID "$@"; }

step "D. a uid-1000 client and a root client (under MPS: about 4096 MiB free, 16 SMs on an H100 at 12.5%)"
as_client setpriv --reuid 1000 --regid 1000 --clear-groups "$PYBIN" "$ROOT/mem.py"; echo "[uid-1000 rc=$?]"
as_client "$PYBIN" "$ROOT/mem.py"; echo "[root rc=$?]"

step "E. terminate_client on a running uid-1000 client"
as_client setpriv --reuid 1000 --regid 1000 --clear-groups "$PYBIN" "$ROOT/loop.py" 30 >"$ROOT/loop.out" 2>&1 &
CLIENTS+=("$!")
for _ in $(seq 100); do grep -q running "$ROOT/loop.out" && break; sleep 0.2; done
VICTIM=$(grep -o 'pid [0-9]*' "$ROOT/loop.out" | grep -o '[0-9]*')
echo "clients of $SERVER: $(echo "get_client_list $SERVER" | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL" | tr '\n' ' ')"
ctl terminate_client "$SERVER" "$VICTIM"
sleep 3
echo "client $VICTIM alive afterwards: $(kill -0 "$VICTIM" 2>/dev/null && echo yes || echo no)"
cat "$ROOT/loop.out"
fi

step "F. quit, and what the daemon and its servers called"
stop_daemon
tail -n 10 "$ROOT/daemon.out"
if [ -n "$STRACE" ] && [ -f "$ROOT/trace" ]; then
  echo "-- signals, ptrace, id and capability calls:"
  grep -E 'kill\(|tgkill\(|tkill\(|ptrace\(|process_vm_readv\(|pidfd|set(res)?[ug]id\(|setgroups\(|capset\(|prctl\(' "$ROOT/trace" | sed -E 's/^[0-9]+ +//' | sort | uniq -c | sort -rn | head -40
  cp "$ROOT/trace" "${OUT:-$ROOT}/sandbox.trace" 2>/dev/null
fi
