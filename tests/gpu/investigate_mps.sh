#!/bin/bash
# What does an MPS client need, and what can it do? Run as root on a machine with an NVIDIA
# GPU (the device tool's lent H100/H200). Changes no GPU setting: the daemon lives under
# /tmp and is quit on exit. Findings are written up in docs/mps.md.
#   tests/gpu/investigate_mps.sh [LOGFILE]
set -u
LOG=${1:-/dev/stdout}
exec >"$LOG" 2>&1
ROOT=/tmp/mpsinv
CTR=/run/vgpu-ctr-mps   # stands in for the container path of the pipe directory
rm -rf "$ROOT"; mkdir -p "$ROOT" "$CTR"; chmod 755 "$ROOT"
cp tests/gpu/mps_client.py "$ROOT/client.py"; chmod 644 "$ROOT/client.py"
CTL=$(command -v nvidia-cuda-mps-control)
UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
PIPE=$ROOT/pipe/$UUID
LOGD=$ROOT/log/$UUID
PY=$(command -v python3)
DAEMON_PID=
BASEENV=(PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/tmp
  NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1)
[ -n "${LD_LIBRARY_PATH:-}" ] && BASEENV+=("LD_LIBRARY_PATH=$LD_LIBRARY_PATH")

step() { echo; echo "=== $(date +%T.%N | cut -c1-12) $*"; }
ctl() { echo "$*" | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL"; echo "[rc=$?]"; }
ctl_as() { local uid=$1; shift
  setpriv --reuid "$uid" --regid "$uid" --clear-groups sh -c "echo '$*' | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 $CTL"; echo "[rc=$?]"; }
start_daemon() {
  mkdir -p "$PIPE" "$LOGD"; chmod 755 "$ROOT/pipe" "$PIPE" "$ROOT/log" "$LOGD"
  CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_MPS_LOG_DIRECTORY=$LOGD \
    "$CTL" -f "$@" >>"$ROOT/daemon.out" 2>&1 &
  DAEMON_PID=$!
  for _ in $(seq 100); do
    echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 2 "$CTL" >/dev/null 2>&1 && { echo "daemon $DAEMON_PID ($*) answers"; return 0; }
    sleep 0.1
  done
  echo "daemon $DAEMON_PID did not answer"
}
stop_daemon() {
  [ -z "$DAEMON_PID" ] && return
  ctl quit; for _ in $(seq 50); do kill -0 "$DAEMON_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$DAEMON_PID" 2>/dev/null; wait "$DAEMON_PID" 2>/dev/null; DAEMON_PID=
}
server_pids() { ps -eo pid=,args= | awk '$2 ~ /mps-server/ {print $1}'; }
cleanup() {
  step cleanup
  stop_daemon
  for d in "$ROOT"/pipe2 "$ROOT"/pipe3; do [ -S "$d/control" ] && echo quit | CUDA_MPS_PIPE_DIRECTORY=$d timeout 5 "$CTL"; done
  sleep 1
  for p in $(server_pids); do echo "killing leftover server $p"; kill -9 "$p"; done
  ps -eo pid,user,comm,args | grep -i mps | grep -v grep
  umount "$CTR" 2>/dev/null; rmdir "$CTR" 2>/dev/null
}
trap cleanup EXIT

# client LABEL UID NSFLAGS SHM RO MOUNTPIPE(0/1) -- extra env... -- client args
# The container.sh wrapper sets up the private mounts inside the new namespaces.
cat >"$ROOT/container.sh" <<'EOF'
#!/bin/sh
set -e
shm=$1 ro=$2 uid=$3 host=$4 ctr=$5; shift 5
if [ "$shm" = 1 ]; then mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm; fi
if [ -n "$host" ]; then
  mount --bind "$host" "$ctr"
  if [ "$ro" = 1 ]; then mount -o remount,bind,ro "$ctr"; fi
fi
if [ "$uid" != 0 ]; then exec setpriv --reuid "$uid" --regid "$uid" --clear-groups "$@"; fi
exec "$@"
EOF
chmod 755 "$ROOT/container.sh"

run_client() { # LABEL UID "UNSHARE FLAGS" SHM RO MOUNT PINNED [client args...]
  local label=$1 uid=$2 ns=$3 shm=$4 ro=$5 mnt=$6 pinned=$7; shift 7
  local host="" pipe=$PIPE
  if [ "$mnt" = 1 ]; then host=$PIPE; pipe=$CTR; fi
  local envs=("${BASEENV[@]}" "CUDA_MPS_PIPE_DIRECTORY=$pipe")
  [ -n "$pinned" ] && envs+=("CUDA_MPS_PINNED_DEVICE_MEM_LIMIT=$pinned")
  if [ -n "$ns" ]; then
    timeout 60 unshare $ns "$ROOT/container.sh" "$shm" "$ro" "$uid" "$host" "$CTR" \
      env -i "${envs[@]}" "$PY" "$ROOT/client.py" --label "$label" "$@"
  elif [ "$uid" != 0 ]; then
    timeout 60 setpriv --reuid "$uid" --regid "$uid" --clear-groups env -i "${envs[@]}" "$PY" "$ROOT/client.py" --label "$label" "$@"
  else
    timeout 60 env -i "${envs[@]}" "$PY" "$ROOT/client.py" --label "$label" "$@"
  fi
  echo "[client $label rc=$?]"
}

step "S0 machine"
date -u; uname -r; nvidia-smi; nvidia-smi -q | grep -i -E "driver version|cuda version|compute mode|mig mode|current  *: " | head -20
ls -la /dev/nvidia* ; echo "CTL=$CTL"; command -v nvidia-cuda-mps-server; ls -la "$(dirname "$CTL")" | grep -i mps
env | grep -E '^(LD_|CUDA|NVIDIA|NCCL|PYTHON)' ; unshare --version; setpriv --version
ls -la /dev/shm; ls -la /run | head -40
"$PY" -c 'import sys, torch, grpc, google.protobuf, click; print(sys.version); print("torch", torch.__version__, torch.__file__, torch.version.cuda); print("grpc", grpc.__version__, "protobuf", google.protobuf.__version__, "click", click.__version__)'
"$PY" -c 'import pytest; print("pytest", pytest.__version__)' || echo "NO PYTEST"
"$PY" -m pip show nvidia-ml-py 2>/dev/null | head -2

step "S0b control program help (-h, --help), rc"
"$CTL" -h; echo "[rc=$?]"; "$CTL" --help </dev/null; echo "[rc=$?]"

step "S0c non-root can import torch and init CUDA without MPS"
setpriv --reuid 1000 --regid 1000 --clear-groups env -i "${BASEENV[@]}" "$PY" -c 'import torch; print("uid1000 cuda", torch.cuda.is_available(), torch.cuda.device_count())'

step "S1 NVML backend smoke"
PYTHONPATH=. "$PY" - <<'EOF'
import time, pynvml
from vgpu_agent.gpus.nvml import NvmlBackend
from vgpu_agent.model.errors import GpuError
b = NvmlBackend()
print("driver", b.driver_version())
gpus = b.list_gpus()
for g in gpus:
    print(g)
    print("  compute mode", b.get_compute_mode(g.uuid))
    b.check(g.uuid)
    h = pynvml.nvmlDeviceGetHandleByUUID(g.uuid)
    try: print("  supported events 0x%x" % pynvml.nvmlDeviceGetSupportedEventTypes(h))
    except pynvml.NVMLError as e: print("  supported events error", e)
    try: print("  numa via nvml", pynvml.nvmlDeviceGetNumaNodeId(h))
    except pynvml.NVMLError as e: print("  numa via nvml error", e, getattr(e, "value", None))
for bad in ("GPU-00000000-0000-0000-0000-000000000000", "nonsense"):
    try: b.check(bad); print("check", bad, "passed?!")
    except GpuError as e: print("check", bad, "->", type(e).__name__, e)
try: b.set_compute_mode("GPU-00000000-0000-0000-0000-000000000000", __import__("vgpu_agent.model.gpu").gpu.ComputeMode.DEFAULT)
except GpuError as e: print("set on bad uuid ->", type(e).__name__, e)
print("unwatched", b.watch_events([g.uuid for g in gpus]))
t = time.monotonic(); print("events", b.wait_events(0.3), "after %.2fs" % (time.monotonic() - t))
b.close(); print("closed")
EOF

step "S2 control client with no daemon (missing dir, empty dir)"
time (echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$ROOT/missing timeout 5 "$CTL"; echo "[rc=$?]")
mkdir -p "$ROOT/empty"; echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$ROOT/empty timeout 5 "$CTL"; echo "[rc=$?]"; ls -la "$ROOT/empty"

step "S3 start daemon -f -M; files"
ls -la /dev/shm > "$ROOT/shm.before"
start_daemon -M
ls -la "$PIPE" "$LOGD"; stat -c '%A %U %n' "$PIPE"/*; cat "$ROOT/daemon.out"
ps -o pid,ppid,user,sid,args -p "$DAEMON_PID"
grep -E "$ROOT|@" /proc/net/unix | head
time (ctl get_server_list)

step "S4 root client holding 6s while we look"
run_client base 0 "" 0 0 0 "0=20000M" --hold-s 6 --alloc-mib 19000 --alloc-mib 21000 > "$ROOT/base.json" &
CP=$!
sleep 5
echo "-- pipe dir:"; ls -la "$PIPE"; echo "-- /dev/shm diff:"; ls -la /dev/shm | diff "$ROOT/shm.before" -
echo "-- unix sockets:"; grep -E "$ROOT|@" /proc/net/unix | head -20
ctl get_server_list
SP=$(echo get_server_list | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL" | head -1)
ctl "get_client_list $SP"; ctl ps; ctl "get_server_status $SP"
ps -eo pid,ppid,user,sid,args | grep -i mps | grep -v grep
[ -n "$SP" ] && { echo "-- server fds:"; ls -la /proc/"$SP"/fd | awk '{print $NF}' | sort | uniq -c | sort -rn | head -20; }
wait $CP; cat "$ROOT/base.json"
echo "-- logs:"; tail -20 "$LOGD/control.log"; tail -20 "$LOGD/server.log"

step "S5 (a) new mount ns, private /dev/shm, pipe dir bind-mounted at $CTR (root)"
run_client mntns 0 "-m" 1 0 1 "0=20000M"
step "S6 (b) new IPC ns, host paths"
run_client ipcns 0 "-i" 0 0 0 "0=20000M"
step "S7 new net ns (abstract sockets would break here)"
run_client netns 0 "-n" 0 0 0 "0=20000M"
step "S8 new pid ns"
run_client pidns 0 "-p -f --mount-proc" 0 0 0 "0=20000M"
step "S9 (c) pipe dir bind-mounted read-only"
run_client ro 0 "-m" 1 1 1 "0=20000M"
step "S10 (d) uid 1000 and 2000, host ns, dirs 0755 root-owned"
run_client u1000 1000 "" 0 0 0 "0=20000M"
run_client u2000 2000 "" 0 0 0 "0=20000M"
step "S10b container-like: mount+ipc+net+pid+uts ns, private shm, ro pipe at container path, uid 1000"
run_client ctr1000 1000 "-m -i -n -u -p -f --mount-proc" 1 1 1 "0=20000M" --alloc-mib 19000 --alloc-mib 21000
step "S11 pipe dir mode 0711 (no listing), uid 1000"
chmod 711 "$PIPE"; run_client u1000_0711 1000 "" 0 0 0 "0=20000M"; chmod 755 "$PIPE"

step "S12 (e) control commands from uid 1000"
ctl_as 1000 get_server_list
ctl_as 1000 get_default_active_thread_percentage
ctl_as 1000 set_default_active_thread_percentage 50
ctl get_default_active_thread_percentage
ctl set_default_active_thread_percentage 100
step "S12b control socket 0600: does uid 1000 lose control, do its clients still work?"
stat -c '%a %U %n' "$PIPE"/*
chmod 600 "$PIPE/control"
ctl_as 1000 get_server_list
run_client u1000_ctl600 1000 "" 0 0 0 "0=20000M"
run_client root_ctl600 0 "" 0 0 0 "0=20000M"
step "S12c all sockets but the server's own root-only? (try control and log dir root-only variants)"
ls -la "$PIPE"
chmod 666 "$PIPE/control" 2>/dev/null
step "S12d uid 1000 sends quit"
ctl_as 1000 quit
sleep 1; kill -0 "$DAEMON_PID" 2>/dev/null && echo "daemon still alive after uid-1000 quit" || echo "daemon GONE after uid-1000 quit"
ctl get_server_list
kill -0 "$DAEMON_PID" 2>/dev/null || { wait "$DAEMON_PID"; DAEMON_PID=; start_daemon -M; }

multiuser_test() { # name
  step "S13 concurrency of users ($1): uid 1000 holds 8 s; root and uid 2000 start 2 s later"
  run_client "$1-holder1000" 1000 "" 0 0 0 "0=20000M" --hold-s 8 > "$ROOT/$1.holder" &
  local h=$!
  sleep 2
  run_client "$1-root" 0 "" 0 0 0 "0=20000M" --hold-s 1 > "$ROOT/$1.root" &
  local r=$!
  run_client "$1-u2000" 2000 "" 0 0 0 "0=20000M" --hold-s 1 > "$ROOT/$1.u2000" &
  local u=$!
  sleep 4; ctl get_server_list; wait $h $r $u
  cat "$ROOT/$1.holder" "$ROOT/$1.root" "$ROOT/$1.u2000"
  "$PY" - "$ROOT/$1.holder" "$ROOT/$1.root" "$ROOT/$1.u2000" <<'EOF'
import json, sys
rows = [json.loads(open(p).readline()) for p in sys.argv[1:]]
holder = rows[0]
for r in rows:
    print(r["label"], "uid", r["uid"], "start %.2f first_kernel %.2f end %.2f free_mib %s err %s" % (
        r["start"] - holder["start"], r.get("first_kernel", 0) - holder["start"],
        r["end"] - holder["start"], r.get("free_mib"), r.get("error")))
for r in rows[1:]:
    print("%s got the GPU %.2f s after start; holder released at %.2f" % (
        r["label"], r.get("first_kernel", 0) - r["start"], holder.get("held_until", 0) - holder["start"]))
EOF
}
multiuser_test multi
step "S14 restart daemon without -M"
stop_daemon; start_daemon
multiuser_test single

step "S15 liveness: SIGSTOP, kill -9, restart on the same pipe dir"
kill -STOP "$DAEMON_PID"
time (ctl get_server_list)
kill -CONT "$DAEMON_PID"; ctl get_server_list
run_client warm 0 "" 0 0 0 "0=20000M" --hold-s 0 >/dev/null
SERVERS=$(server_pids); echo "servers: $SERVERS"
kill -9 "$DAEMON_PID"; wait "$DAEMON_PID" 2>/dev/null; DAEMON_PID=
ls -la "$PIPE"; time (ctl get_server_list)
echo "servers after kill: $(server_pids)"
start_daemon -M
ctl get_server_list; tail -5 "$ROOT/daemon.out"; tail -5 "$LOGD/control.log"
run_client after_restart 0 "" 0 0 0 "0=20000M"
stop_daemon
for p in $(server_pids); do echo "leftover server $p"; done

step "S16 daemon with missing pipe/log dirs"
rm -rf "$ROOT/pipe2" "$ROOT/log2"
CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe2 CUDA_MPS_LOG_DIRECTORY=$ROOT/log2 "$CTL" -f >"$ROOT/d2.out" 2>&1 &
D2=$!; sleep 2; ls -la "$ROOT/pipe2" "$ROOT/log2"; cat "$ROOT/d2.out"
echo quit | CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe2 timeout 5 "$CTL"; sleep 1; kill -9 $D2 2>/dev/null; wait $D2 2>/dev/null
step "S17 -d mode: who is the daemon's parent, does quit work"
CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe3 CUDA_MPS_LOG_DIRECTORY=$ROOT/log3 "$CTL" -d; echo "[rc=$?]"
mkdir -p "$ROOT/pipe3" "$ROOT/log3"
CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe3 CUDA_MPS_LOG_DIRECTORY=$ROOT/log3 "$CTL" -d; echo "[rc=$?]"
sleep 1; ps -eo pid,ppid,sid,args | grep mps-control | grep -v grep
echo quit | CUDA_MPS_PIPE_DIRECTORY=$ROOT/pipe3 timeout 5 "$CTL"; echo "[rc=$?]"; sleep 1
ps -eo pid,ppid,sid,args | grep mps-control | grep -v grep
step "done"
