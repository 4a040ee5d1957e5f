#!/bin/bash
# Isolation facts the agent builds on (issue 20): how the real MPS control daemon creates
# its pipe-directory entries, whether `start_server -uid 0` gives a multi-user daemon a
# server before any client, and whether a uid-1000 process holding the flock of a killed
# daemon's control_lock keeps the next daemon from starting (and whether removing the stale
# lock file first lets it start). Run as root on a machine with an NVIDIA GPU. Changes no
# GPU setting: the daemon lives under /tmp and is quit on exit.
#   tests/gpu/investigate_isolation.sh [LOGFILE]
set -u
LOG=${1:-/dev/stdout}
exec >"$LOG" 2>&1
ROOT=/tmp/vgpu-isolation
rm -rf "$ROOT"; mkdir -p "$ROOT"; chmod 755 "$ROOT"
CTL=$(command -v nvidia-cuda-mps-control)
UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
PIPE=$ROOT/pipe/$UUID
LOGD=$ROOT/log/$UUID
DAEMON_PID=
ATTACKER=
SERVERS=()
PYBIN=$(command -v python3)

step() { echo; echo "=== $(date +%T.%N | cut -c1-12) $*"; }
ctl() { echo "$*" | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL"; echo "[rc=$?]"; }
modes() { for entry in "$PIPE"/*; do stat -c '%A %U %n' "$entry"; done; }
start_daemon() {
  mkdir -p "$PIPE" "$LOGD"; chmod 755 "$ROOT/pipe" "$PIPE" "$ROOT/log" "$LOGD"
  (umask "${UMASK:-022}"; CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE \
    CUDA_MPS_LOG_DIRECTORY=$LOGD exec "$CTL" -f -M >>"$ROOT/daemon.out" 2>&1) &
  DAEMON_PID=$!
  for _ in $(seq 100); do
    echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 2 "$CTL" >/dev/null 2>&1 && { echo "daemon $DAEMON_PID answers"; return 0; }
    kill -0 "$DAEMON_PID" 2>/dev/null || { wait "$DAEMON_PID"; echo "daemon exited with $?: $(tail -n 2 "$ROOT/daemon.out")"; DAEMON_PID=; return 1; }
    sleep 0.05
  done
  echo "daemon $DAEMON_PID did not answer"
}
remember_servers() { for pid in $(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL" 2>/dev/null); do SERVERS+=("$pid"); done; }
stop_daemon() {
  [ -z "$DAEMON_PID" ] && return
  remember_servers
  ctl quit; for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; DAEMON_PID=
}
cleanup() {
  step cleanup
  [ -n "$ATTACKER" ] && kill -9 "$ATTACKER" 2>/dev/null
  stop_daemon
  sleep 1
  # Only servers our daemons started (their pids came from our get_server_list).
  for pid in "${SERVERS[@]}"; do kill -0 "$pid" 2>/dev/null && { echo "killing our leftover server $pid"; kill -9 "$pid"; }; done
  ps -eo pid,user,args | grep -i mps | grep -v grep
}
trap cleanup EXIT

step "A. entry modes: daemon under umask 077, control_lock pre-created 0600 by root"
mkdir -p "$PIPE"; chmod 755 "$ROOT" "$PIPE"; (umask 077; : >"$PIPE/control_lock")
stat -c '%A %U %n (before the daemon)' "$PIPE/control_lock"
UMASK=077 start_daemon
modes
stop_daemon

step "A2. the same with umask 022 and no pre-created entry"
rm -rf "$PIPE"; start_daemon; modes

step "A3. umask 022, control_lock pre-created 0600 by root (what the agent does now)"
stop_daemon; rm -rf "$PIPE"; mkdir -p "$PIPE"; chmod 755 "$PIPE"; (umask 077; : >"$PIPE/control_lock")
start_daemon; modes
stop_daemon; rm -rf "$PIPE"; start_daemon

step "B. start_server -uid 0 on a multi-user daemon before any client"
ctl set_default_device_pinned_mem_limit 0 4096M
ctl get_server_list
started=$(date +%s%N)
ctl start_server -uid 0
for _ in $(seq 100); do
  list=$(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 2 "$CTL")
  [ -n "$list" ] && break; sleep 0.05
done
echo "server list after $(( ($(date +%s%N) - started) / 1000000 )) ms: $list"
remember_servers
for pid in $list; do ps -o pid=,user=,args= -p "$pid"; ctl get_server_status "$pid"; ctl get_device_pinned_mem_limit "$pid" 0; done
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
ctl start_server -uid 0
ctl start_server -uid 1000
ctl get_server_list

step "C. a uid-1000 client joins that server (4096M limit: MPS if it sees about 3.3 GiB free)"
cat >"$ROOT/client.py" <<'EOF'
import torch
free, total = torch.cuda.mem_get_info()
print(f"free {free >> 20} MiB of {total >> 20} MiB")
EOF
chmod 644 "$ROOT/client.py"
setpriv --reuid 1000 --regid 1000 --clear-groups env -i PATH=/usr/bin:/bin HOME=/tmp ${LD_LIBRARY_PATH:+LD_LIBRARY_PATH=$LD_LIBRARY_PATH} \
  CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID "$PYBIN" "$ROOT/client.py"
echo "[client rc=$?]"
ctl get_server_list

step "D. uid 1000 takes control_lock's flock and a POSIX read lock through a read-only bind mount (no lockdown)"
cat >"$ROOT/attack.py" <<'EOF'
import fcntl, os, sys, time
path = sys.argv[1]
handle = open(path)
print("opened", path, flush=True)
fcntl.flock(handle, fcntl.LOCK_EX)
print("holding the flock", flush=True)
fcntl.lockf(handle, fcntl.LOCK_SH)
print("holding a POSIX read lock too", flush=True)
time.sleep(600)
EOF
chmod 644 "$ROOT/attack.py"
unshare -m sh -c "mkdir -p /mnt/vgpu-ro && mount --bind '$PIPE' /mnt/vgpu-ro && mount -o remount,bind,ro /mnt/vgpu-ro && exec setpriv --reuid 1000 --regid 1000 --clear-groups python3 '$ROOT/attack.py' /mnt/vgpu-ro/control_lock" >"$ROOT/attack.out" 2>&1 &
ATTACKER=$!
sleep 1; cat "$ROOT/attack.out"
remember_servers
kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null; DAEMON_PID=
sleep 0.5; cat "$ROOT/attack.out"
echo "-- restart with the stale control_lock in place:"
start_daemon
echo "-- restart after removing the stale control_lock:"
[ -z "$DAEMON_PID" ] && { rm -f "$PIPE/control_lock"; start_daemon; }
modes
ctl get_server_list
kill -9 "$ATTACKER" 2>/dev/null; ATTACKER=

step "F. the daemon without CAP_SYS_PTRACE (what vgpu-mps@ could drop): do clients still run under MPS?"
stop_daemon; rm -rf "$PIPE"; mkdir -p "$PIPE" "$LOGD"; chmod 755 "$PIPE"
CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_MPS_LOG_DIRECTORY=$LOGD \
  setpriv --bounding-set -sys_ptrace --inh-caps -sys_ptrace "$CTL" -f -M >>"$ROOT/daemon.out" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do ctl get_server_list >/dev/null 2>&1 && break; sleep 0.05; done
grep -E '^Cap(Prm|Eff|Bnd)' "/proc/$DAEMON_PID/status"
ctl set_default_device_pinned_mem_limit 0 4096M
ctl start_server -uid 0
sleep 1; remember_servers
for pid in "${SERVERS[@]}"; do grep -E '^CapEff' "/proc/$pid/status" 2>/dev/null; done
setpriv --reuid 1000 --regid 1000 --clear-groups env -i PATH=/usr/bin:/bin HOME=/tmp ${LD_LIBRARY_PATH:+LD_LIBRARY_PATH=$LD_LIBRARY_PATH} \
  CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID "$PYBIN" "$ROOT/client.py"
echo "[uid-1000 client rc=$?]"
CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID "$PYBIN" "$ROOT/client.py"
echo "[root client rc=$?]"
ctl get_server_list
tail -n 5 "$ROOT/daemon.out"
stop_daemon

step "E. what the daemon and its server open (strace), for vgpu-mps@'s sandbox"
stop_daemon
if command -v strace >/dev/null; then
  rm -rf "$PIPE"; mkdir -p "$PIPE" "$LOGD"; chmod 755 "$PIPE"
  CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_MPS_LOG_DIRECTORY=$LOGD \
    strace -f -qq -o "$ROOT/trace" -e trace=%file,%network,%process,%ipc,kill,tgkill,setuid,setgid,setresuid,setresgid,capset,prctl,setrlimit,prlimit64,sched_setaffinity,mknodat,mknod \
    "$CTL" -f -M >>"$ROOT/daemon.out" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 100); do ctl get_server_list >/dev/null 2>&1 && break; sleep 0.1; done
  ctl start_server -uid 0; sleep 2
  setpriv --reuid 1000 --regid 1000 --clear-groups env -i PATH=/usr/bin:/bin HOME=/tmp ${LD_LIBRARY_PATH:+LD_LIBRARY_PATH=$LD_LIBRARY_PATH} \
    CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID "$PYBIN" "$ROOT/client.py"
  stop_daemon
  sleep 1
  echo "-- syscalls by name:"; sed -E 's/^[0-9]+ +//; s/\(.*//' "$ROOT/trace" | sort | uniq -c | sort -rn | head -40
  echo "-- paths (successful opens/stat, first 200 unique, /proc/<pid> folded):"
  grep -v ' = -1 ' "$ROOT/trace" | grep -oE '"/[^"]*"' | sed -E 's#/proc/[0-9]+#/proc/PID#; s#/task/[0-9]+#/task/TID#' | sort -u | head -200
  echo "-- failed paths (first 60):"
  grep ' = -1 ' "$ROOT/trace" | grep -oE '"/[^"]*"' | sed -E 's#/proc/[0-9]+#/proc/PID#' | sort -u | head -60
  echo "-- sockets and signals:"; grep -E 'socket\(|connect\(|bind\(|kill\(|setres|capset|prctl\(PR_CAP' "$ROOT/trace" | sed -E 's/^[0-9]+ +//' | sed -E 's/[0-9]{3,}/N/g' | sort | uniq -c | sort -rn | head -40
else
  echo "no strace"
fi
