#!/bin/bash
# Tenant facts the agent's per-pod enforcement and fault policy build on (issue 20):
#   T. what `terminate_client <server> <client>` does to the client and to its neighbours,
#      what NVML lists afterwards, and whether the client can start CUDA work again;
#   N. how soon a new client shows in `get_client_list` (and in control.log) compared with
#      its first kernel (can a client be ended before it does anything?);
#   F. which pid the MPS server's log names for a fatal fault, compared with the faulter's;
#   G. the same with the faulter connecting first, and with the faulter alone (does the
#      server name the first client it has, or the faulter?);
#   E. what the daemon and its server open and call (strace, when STRACE points at one),
#      for vgpu-mps@'s sandbox.
# Run as root on a machine with an NVIDIA GPU. Changes no GPU setting: the daemon lives
# under /tmp and is quit on exit; only clients this script started are ended.
#   tests/gpu/investigate_tenants.sh [LOGFILE]
set -u
LOG=${1:-/dev/stdout}
exec >"$LOG" 2>&1
ROOT=/tmp/vgpu-tenants
rm -rf "$ROOT"; mkdir -p "$ROOT"; chmod 755 "$ROOT"
CTL=$(command -v nvidia-cuda-mps-control)
UUID=$(nvidia-smi --query-gpu=uuid --format=csv,noheader | head -1)
PIPE=$ROOT/pipe/$UUID
LOGD=$ROOT/log/$UUID
DAEMON_PID=
SERVERS=()
CLIENTS=()
PYBIN=$(command -v python3)
STRACE=${STRACE:-}
STEPS=${STEPS:-TNFEH}
PREFIX=()
want() { case "$STEPS" in *"$1"*) return 0;; esac; return 1; }

step() { echo; echo "=== $(date +%T.%N | cut -c1-12) $*"; }
ctl() { echo "$*" | CUDA_MPS_PIPE_DIRECTORY=$PIPE timeout 5 "$CTL"; }
start_daemon() {
  mkdir -p "$PIPE" "$LOGD"; chmod 755 "$ROOT/pipe" "$PIPE" "$ROOT/log" "$LOGD"
  (CUDA_VISIBLE_DEVICES=$UUID CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_MPS_LOG_DIRECTORY=$LOGD \
    exec "${PREFIX[@]}" "$CTL" -f -M >>"$ROOT/daemon.out" 2>&1) &
  DAEMON_PID=$!
  for _ in $(seq 100); do ctl get_server_list >/dev/null 2>&1 && { echo "daemon $DAEMON_PID answers"; return 0; }; sleep 0.05; done
  echo "daemon did not answer"; return 1
}
remember_servers() { for pid in $(ctl get_server_list 2>/dev/null); do SERVERS+=("$pid"); done; }
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
  for pid in "${SERVERS[@]}"; do kill -0 "$pid" 2>/dev/null && { echo "killing our leftover server $pid"; kill -9 "$pid"; }; done
  ps -eo pid,user,args | grep -i mps | grep -v grep
}
trap cleanup EXIT

cat >"$ROOT/loop.py" <<'EOF'
import json, os, sys, time
label, seconds = sys.argv[1], float(sys.argv[2])
fault_at = float(sys.argv[3]) if len(sys.argv) > 3 else -1.0
def say(**kw):
    kw.update(label=label, pid=os.getpid(), t=round(time.time(), 3))
    print(json.dumps(kw), flush=True)
say(event="start")
import torch
a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16)
torch.cuda.synchronize(); say(event="first-kernel")
began = time.time(); iters = 0; last = began; errors = 0
while time.time() - began < seconds:
    try:
        if 0 <= fault_at <= time.time() - began:
            fault_at = -1.0
            wild = torch.cuda.jiterator._create_jit_fn(
                "template <typename T> T wild_read(T x) { return x + *reinterpret_cast<volatile T*>(0x100000000ULL); }")
            say(event="faulting"); wild(torch.ones(1 << 20, device="cuda"))
        for _ in range(10): a @ a
        torch.cuda.synchronize(); iters += 10
    except Exception as exc:
        errors += 1; say(event="error", n=errors, iters=iters, error=str(exc)[:160])
        if errors >= 3: break
        time.sleep(0.5)
        try:
            a = torch.randn(2048, 2048, device="cuda", dtype=torch.float16); torch.cuda.synchronize()
            say(event="recovered")
        except Exception as exc2:
            say(event="no-recovery", error=str(exc2)[:160])
    if time.time() - last >= 1.0:
        say(event="tick", iters=iters); last = time.time()
say(event="end", iters=iters, errors=errors)
EOF

run_client() { # label seconds [fault_at]
  HOME=/tmp CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID setpriv --reuid 1000 --regid 1000 --clear-groups \
    "$PYBIN" "$ROOT/loop.py" "$@" >"$ROOT/$1.out" 2>"$ROOT/$1.err" &
  CLIENTS+=("$!")
}
wait_clients() { for pid in "${CLIENTS[@]}"; do wait "$pid"; done; CLIENTS=(); }
smi() { nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader; }

start_daemon || exit 1
ctl set_default_active_thread_percentage 12.5; ctl start_server -uid 0; sleep 1
SERVER=$(ctl get_server_list | head -1); echo "server $SERVER"
if want T; then
step "T. terminate_client on one of three clients"
run_client t-a 14; run_client t-b 14; run_client t-c 14
for _ in $(seq 200); do [ "$(ctl get_client_list "$SERVER" | wc -l)" -ge 3 ] && break; sleep 0.1; done
sleep 3
echo "-- clients: $(ctl get_client_list "$SERVER" | tr '\n' ' ')"; smi
VICTIM=$(grep -m1 -o '"pid": [0-9]*' "$ROOT/t-a.out" | grep -o '[0-9]*')
echo "-- terminate_client $SERVER $VICTIM at $(date +%s.%N)"
time ctl terminate_client "$SERVER" "$VICTIM"; echo "[rc=$?]"
sleep 2
echo "-- clients after: $(ctl get_client_list "$SERVER" | tr '\n' ' ')"; smi
echo "-- is $VICTIM alive: $(kill -0 "$VICTIM" 2>/dev/null && echo yes || echo no)"
wait_clients
for c in t-a t-b t-c; do echo "-- $c"; grep -v tick "$ROOT/$c.out"; grep tick "$ROOT/$c.out" | tail -n 12 | cut -c1-120; tail -n 3 "$ROOT/$c.err"; done
echo "-- control.log"; tail -n 25 "$LOGD/control.log"; echo "-- server.log"; tail -n 25 "$LOGD/server.log"

fi
if want N; then
step "N. a new client: when get_client_list lists it, against its first kernel"
run_client n-a 3
T0=$(date +%s.%N)
while :; do
  now=$(date +%s.%N); listed=$(ctl get_client_list "$SERVER" | tr '\n' ' ')
  [ -n "$listed" ] && { echo "listed at $now: $listed"; break; }
  awk "BEGIN{exit !($now - $T0 > 30)}" && { echo "never listed"; break; }
  sleep 0.02
done
wait_clients; cat "$ROOT/n-a.out" | grep -v tick; grep -i "client" "$LOGD/control.log" | tail -n 4

fi
if want F; then
step "F. which pid the server's log names for a fault"
run_client f-v1 10; run_client f-v2 10; run_client f-bad 10 3
wait_clients
for c in f-v1 f-v2 f-bad; do echo "-- $c"; grep -v tick "$ROOT/$c.out"; done
echo "-- server.log"; tail -n 15 "$LOGD/server.log"
dmesg 2>/dev/null | grep -i xid | tail -n 3
echo "-- server list after: $(ctl get_server_list | tr '\n' ' ')"
echo "-- the daemon's own output (foreground: its log and its servers' go here)"; grep -v "^\s*$" "$ROOT/daemon.out" | tail -n 30
fi
if want G; then
step "G1. the faulter connects first, two neighbours after it"
mark=$(wc -l <"$ROOT/daemon.out")
run_client g-bad 12 7; sleep 2; run_client g-v1 12; sleep 1; run_client g-v2 12
wait_clients
for c in g-bad g-v1 g-v2; do echo "-- $c"; grep -v tick "$ROOT/$c.out" | cut -c1-200; done
echo "-- daemon output since"; tail -n +"$((mark + 1))" "$ROOT/daemon.out" | grep -v "^\s*$" | tail -n 30
sleep 2
step "G2. the faulter alone on the GPU"
mark=$(wc -l <"$ROOT/daemon.out")
run_client g-solo 8 3
wait_clients
echo "-- g-solo"; grep -v tick "$ROOT/g-solo.out" | cut -c1-200
echo "-- daemon output since"; tail -n +"$((mark + 1))" "$ROOT/daemon.out" | grep -v "^\s*$" | tail -n 30
dmesg 2>/dev/null | grep -i xid | tail -n 4
echo "-- server list after: $(ctl get_server_list | tr '\n' ' ')"
fi
stop_daemon

if want E; then
step "E. strace of the daemon and its server"
if [ -n "$STRACE" ]; then
  PREFIX=("$STRACE" -f -qq -o "$ROOT/trace" -e trace=%file,%network,%process,%ipc,kill,tgkill,setuid,setgid,setresuid,setresgid,capset,prctl,setrlimit,prlimit64,sched_setaffinity,mknodat,mknod,ioctl)
  start_daemon; PREFIX=()
  ctl set_default_active_thread_percentage 12.5; ctl start_server -uid 0; sleep 1
  run_client e-a 3; wait_clients
  stop_daemon; sleep 1
  echo "-- syscalls by name:"; sed -E 's/^[0-9]+ +//; s/\(.*//' "$ROOT/trace" | sort | uniq -c | sort -rn | head -50
  echo "-- paths opened successfully (folded):"
  grep -v ' = -1 ' "$ROOT/trace" | grep -E 'open|stat|access|mkdir|unlink|rename|chmod|chown|bind|connect|readlink|mknod' | grep -oE '"/[^"]*"' | sed -E 's#/proc/[0-9]+#/proc/PID#; s#/task/[0-9]+#/task/TID#; s#[0-9a-f]{8}-[0-9a-f-]{27}#UUID#' | sort | uniq -c | sort -rn | head -120
  echo "-- writes/creates (O_WRONLY|O_RDWR|O_CREAT):"
  grep -v ' = -1 ' "$ROOT/trace" | grep -E 'O_WRONLY|O_RDWR|O_CREAT|mkdir|unlink|rename|chmod|chown|mknod' | grep -oE '"/[^"]*"' | sed -E 's#/proc/[0-9]+#/proc/PID#' | sort -u | head -60
  echo "-- failed paths:"; grep ' = -1 ' "$ROOT/trace" | grep -oE '"/[^"]*"' | sed -E 's#/proc/[0-9]+#/proc/PID#' | sort -u | head -40
  echo "-- sockets, signals, ids, caps:"; grep -E 'socket\(|connect\(|bind\(|kill\(|setres|setuid|setgid|capset|prctl\(|prlimit|setrlimit|sched_setaff' "$ROOT/trace" | sed -E 's/^[0-9]+ +//; s/[0-9]{3,}/N/g' | sort | uniq -c | sort -rn | head -40
  echo "-- ioctl devices:"; grep -oE 'ioctl\([0-9]+' "$ROOT/trace" | wc -l
  cp "$ROOT/trace" "${OUT:-$ROOT}/daemon.trace" 2>/dev/null
else
  echo "no strace (set STRACE)"
fi
fi

if want H; then
step "H. the daemon behind a /proc that hides other users' processes (ProtectProc=invisible, ProcSubset=pid) and without CAP_SYS_PTRACE"
rm -rf "$PIPE"
PREFIX=(unshare -m -- sh -c 'mount -t proc -o hidepid=invisible,subset=pid proc /proc && exec setpriv --bounding-set -sys_ptrace "$0" "$@"')
start_daemon; PREFIX=()
ctl set_default_device_pinned_mem_limit 0 4096M; ctl set_default_active_thread_percentage 12.5; ctl start_server -uid 0; sleep 1
SERVER=$(ctl get_server_list | head -1); echo "server $SERVER"
grep -E 'CapBnd' /proc/"$(cat "$PIPE"/nvidia-cuda-mps-control.pid 2>/dev/null || echo self)"/status
cat >"$ROOT/mem.py" <<'EOF2'
import json, torch
free, total = torch.cuda.mem_get_info()
print(json.dumps({"free_mib": free >> 20, "sms": torch.cuda.get_device_properties(0).multi_processor_count}))
EOF2
HOME=/tmp CUDA_MPS_PIPE_DIRECTORY=$PIPE CUDA_VISIBLE_DEVICES=$UUID setpriv --reuid 1000 --regid 1000 --clear-groups "$PYBIN" "$ROOT/mem.py"
echo "[uid-1000 client rc=$?]"
echo "-- clients of $SERVER: $(ctl get_client_list "$SERVER" | tr '\n' ' ')"
grep -v "^\s*$" "$ROOT/daemon.out" | tail -n 8
stop_daemon
fi
