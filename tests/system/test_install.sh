#!/bin/bash
# The system test's body (scripts/test-system prepares its inputs): boots $ROOTFS with
# systemd-nspawn (systemd as PID 1, changes kept in a throw-away overlay), installs
# $DEB_OLD, checks the agent with systemctl and journalctl, upgrades to $DEB_NEW, then
# removes and purges. Prints one PASS/FAIL line per check and a summary; exits non-zero
# when a check failed. The container is always torn down.
set -uo pipefail

: "${ROOTFS:?root filesystem to boot}" "${DEB_OLD:?previous .deb}" "${DEB_NEW:?current .deb}"
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
machine=vgpu-systest-$$
work=$(mktemp -d /tmp/vgpu-systest.XXXXXX)
passed=0
failed=0
failures=()
nspawn_pid=
container_pid=

# Simulated GPUs get fixed UUIDs so the checks can name them.
GPU0=GPU-00000000-0000-0000-0000-000000000001
GPU1=GPU-00000000-0000-0000-0000-000000000002

log() { echo "test-system: $*" >&2; }

pass() {
    passed=$((passed + 1))
    echo "PASS  $1"
}

fail() {
    failed=$((failed + 1))
    failures+=("$1")
    echo "FAIL  $1"
    shift
    local line
    for line in "$@"; do echo "      $line"; done
}

# Run a command inside the container (all its namespaces), with a sane environment.
in_ct() {
    nsenter -t "$container_pid" -a \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= \
        DEBIAN_FRONTEND=noninteractive SYSTEMD_COLORS=0 "$@"
}

# check NAME COMMAND...: PASS when the command succeeds; else FAIL with its output.
check() {
    local name=$1 output
    shift
    if output=$("$@" 2>&1); then
        pass "$name"
    else
        # shellcheck disable=SC2206 # split the output into lines for the report
        local IFS=$'\n'
        fail "$name" $(echo "$output" | tail -n 15)
    fi
}

# wait_for SECONDS COMMAND...: poll until the command succeeds (quietly); status 1 on timeout.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    while ! "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

prop() { in_ct systemctl show -p "$2" --value "$1"; }

teardown() {
    local status=$?
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGTERM asks nspawn to halt the container cleanly; a second one kills it.
        kill -TERM "$nspawn_pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$nspawn_pid" 2>/dev/null && kill -KILL "$nspawn_pid" 2>/dev/null
        wait "$nspawn_pid" 2>/dev/null
    fi
    rm -rf "$work"
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------
log "booting $ROOTFS with systemd-nspawn (machine $machine)"
mkdir -p "$work/dist" "$work/fakes"
cp "$DEB_OLD" "$work/dist/old.deb"
cp "$DEB_NEW" "$work/dist/new.deb"
cp "$repo/tests/fakes/fake_mps_control.py" "$work/fakes/"
systemd-nspawn -D "$ROOTFS" --volatile=overlay -M "$machine" \
    --bind-ro="$work/dist:/mnt/dist" --bind-ro="$work/fakes:/mnt/fakes" \
    -b --register=no --keep-unit --console=pipe >"$work/console.log" 2>&1 </dev/null &
nspawn_pid=$!
# The container's PID 1 is nspawn's child once that child has become systemd (before,
# it is nspawn's own set-up process).
for _ in $(seq 300); do
    container_pid=$(cat "/proc/$nspawn_pid/task/$nspawn_pid/children" 2>/dev/null | awk '{print $1}')
    if [ -n "$container_pid" ] && [ "$(cat "/proc/$container_pid/comm" 2>/dev/null)" = systemd ]; then
        break
    fi
    container_pid=
    sleep 0.1
done
if [ -z "$container_pid" ] || ! wait_for 60 in_ct systemctl is-system-running --quiet --wait; then
    state=$( [ -n "$container_pid" ] && in_ct systemctl is-system-running 2>&1)
    # "degraded" still has a working PID 1; anything else means the boot failed.
    if [ "$state" != degraded ]; then
        fail "container boots with systemd as PID 1" "state: ${state:-no PID 1}" \
            "$(tail -n 20 "$work/console.log")"
        exit 1
    fi
fi
pass "container boots with systemd as PID 1 ($(in_ct systemctl --version | head -n 1))"

# ---------------------------------------------------------------------------------------
# Test set-up inside the container, all of it outside the package's files: the config
# selecting simulated GPUs, and runtime drop-ins (in /run, gone with the container) with a
# short watchdog for the agent and a stand-in MPS daemon for the MPS template.
in_ct mkdir -p /etc/vgpu /run/systemd/system/vgpu-agent.service.d \
    /run/systemd/system/vgpu-mps@.service.d /usr/local/lib/vgpu-systest
in_ct sh -c "cat > /etc/vgpu/system-test.toml" <<EOF
version = 1
[gpus]
backend = "simulated"
compute_mode = "unchanged"
[mps]
enabled = false
[[simulated.gpus]]
uuid = "$GPU0"
[[simulated.gpus]]
uuid = "$GPU1"
EOF
# The MPS units get their own config: the fake control program and the same GPUs.
in_ct sh -c "cat > /etc/vgpu/system-test-mps.toml" <<EOF
version = 1
[gpus]
backend = "simulated"
compute_mode = "unchanged"
[mps]
manager = "external"
control_binary = "/usr/local/lib/vgpu-systest/nvidia-cuda-mps-control"
multi_user = "off"
[[simulated.gpus]]
uuid = "$GPU0"
[[simulated.gpus]]
uuid = "$GPU1"
EOF
in_ct cp /mnt/fakes/fake_mps_control.py /usr/local/lib/vgpu-systest/
in_ct sh -c 'printf "%s\n" "#!/bin/sh" "exec /usr/bin/python3 /usr/local/lib/vgpu-systest/fake_mps_control.py \"\$@\"" > /usr/local/lib/vgpu-systest/nvidia-cuda-mps-control && chmod 0755 /usr/local/lib/vgpu-systest/nvidia-cuda-mps-control'
in_ct sh -c "cat > /run/systemd/system/vgpu-agent.service.d/system-test.conf" <<'EOF'
[Service]
Environment=VGPU_CONFIG=/etc/vgpu/system-test.toml
WatchdogSec=3s
RestartSec=1s
EOF

# ---------------------------------------------------------------------------------------
log "installing the previous build"
check "apt-get installs the previous build ($(basename "$DEB_OLD"))" \
    in_ct apt-get install -y -q --no-install-recommends /mnt/dist/old.deb
check "vgpu-agent.service is enabled on install" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl is-enabled vgpu-agent.service)\" = enabled ]"

check "systemd-analyze verify is clean for every unit" \
    in_ct sh -c 'out=$(systemd-analyze verify /lib/systemd/system/vgpu-agent.service /lib/systemd/system/vgpu-compute-mode.service /lib/systemd/system/vgpu-mps@.service 2>&1); echo "$out"; [ -z "$out" ]'

for unit in vgpu-agent.service vgpu-compute-mode.service vgpu-mps@$GPU0.service; do
    exposure=$(in_ct systemd-analyze security "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    echo "INFO  systemd-analyze security $unit: exposure ${exposure:-unknown}"
done
exposure=$(in_ct systemd-analyze security vgpu-agent.service 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
check "the agent's exposure is 3.0 or lower (${exposure:-unknown})" \
    awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 3.0) }'

agent_active() { [ "$(prop vgpu-agent.service ActiveState)" = active ] && [ "$(prop vgpu-agent.service SubState)" = running ]; }
if wait_for 30 agent_active; then
    pass "the agent is active (running) on simulated GPUs"
else
    fail "the agent is active (running) on simulated GPUs" \
        "$(in_ct systemctl status vgpu-agent.service --no-pager -l 2>&1 | tail -n 15)"
fi
status_text=$(prop vgpu-agent.service StatusText)
echo "INFO  STATUS before the kubelet exists: $status_text"
check "STATUS says it waits for the kubelet" \
    sh -c "echo '$status_text' | grep -qi 'waiting for kubelet'"

check "vgpu-compute-mode.service is skipped without an NVIDIA driver" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl show -p ConditionResult --value vgpu-compute-mode.service)\" = no ]"
check "its journal says there is no NVIDIA driver" \
    in_ct sh -c "journalctl -u vgpu-compute-mode.service --no-pager -o cat | grep -q 'no NVIDIA driver on this machine'"

# The kubelet stand-in: a transient unit running the stand-in module from the package's
# private directory, with the package's interpreter.
log "starting the kubelet stand-in"
check "the kubelet stand-in starts" \
    in_ct systemd-run --unit=kubelet-standin --property=Type=exec \
    /usr/bin/python3.11 -I -S -c \
    'import runpy, sys; sys.path.insert(0, "/usr/lib/vgpu-agent"); sys.argv[0] = "kubelet-standin"; runpy.run_module("vgpu_agent.kubelet_standin", run_name="__main__")' \
    --plugin-dir /var/lib/kubelet/device-plugins

registered() { prop vgpu-agent.service StatusText | grep -q "registered with kubelet"; }
if wait_for 30 registered; then
    pass "STATUS reports the registration"
else
    fail "STATUS reports the registration" "STATUS: $(prop vgpu-agent.service StatusText)" \
        "$(in_ct journalctl -u kubelet-standin -u vgpu-agent --no-pager -n 20 2>&1)"
fi
status_text=$(prop vgpu-agent.service StatusText)
echo "INFO  STATUS: $status_text"
check "STATUS names the vGPUs, the GPUs and the resource" \
    sh -c "echo '$status_text' | grep -q 'serving 20 vGPUs on 2 GPUs as eks.amazonaws.com/vgpu'"
standin_saw() { in_ct journalctl -u kubelet-standin --no-pager -o cat | grep -qi "$1"; }
if wait_for 10 standin_saw "eks.amazonaws.com/vgpu"; then
    pass "the kubelet stand-in recorded the registration"
else
    fail "the kubelet stand-in recorded the registration" \
        "$(in_ct journalctl -u kubelet-standin --no-pager -o cat -n 20 2>&1)"
fi
echo "INFO  kubelet stand-in: $(in_ct journalctl -u kubelet-standin --no-pager -o cat | tail -n 3 | tr '\n' '|')"
check "vgpu-agent status lists both GPUs" \
    in_ct sh -c "out=\$(vgpu-agent status 2>&1); echo \"\$out\"; echo \"\$out\" | grep -q $GPU0 && echo \"\$out\" | grep -q $GPU1"

check "journald holds the agent's structured fields (GPU_UUID, VGPU_EVENT)" \
    in_ct sh -c "out=\$(journalctl -u vgpu-agent.service -o json --no-pager); echo \"\$out\" | grep -q '\"GPU_UUID\":\"$GPU0\"' && echo \"\$out\" | grep -q '\"VGPU_EVENT\"'"
echo "INFO  events in the journal: $(in_ct journalctl -u vgpu-agent.service -o json --no-pager | grep -o '"VGPU_EVENT":"[^"]*"' | sort | uniq -c | tr -s ' \n' ' ')"

# ---------------------------------------------------------------------------------------
log "MPS template without a driver"
in_ct systemctl start "vgpu-mps@$GPU0.service" >/dev/null 2>&1
sleep 2
check "vgpu-mps@ is skipped cleanly without an NVIDIA driver (inactive, not failed, not restarted)" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl show -p ConditionResult --value vgpu-mps@$GPU0.service)\" = no ] && [ \"\$(nsenter -t $container_pid -a systemctl show -p ActiveState --value vgpu-mps@$GPU0.service)\" = inactive ] && [ \"\$(nsenter -t $container_pid -a systemctl show -p NRestarts --value vgpu-mps@$GPU0.service)\" = 0 ]"
check "systemctl status says there is no NVIDIA driver" \
    in_ct sh -c "systemctl status vgpu-mps@$GPU0.service --no-pager 2>&1 | grep -q 'no NVIDIA driver on this machine (/dev/nvidiactl is missing)'"
echo "INFO  $(in_ct journalctl -u "vgpu-mps@$GPU0.service" --no-pager -o cat | grep -m1 'NVIDIA driver')"

# ---------------------------------------------------------------------------------------
if in_ct vgpu-agent doctor --help >/dev/null 2>&1; then
    log "vgpu-agent doctor"
    doctor_out=$(in_ct env VGPU_CONFIG=/etc/vgpu/system-test.toml vgpu-agent doctor 2>&1)
    doctor_rc=$?
    echo "$doctor_out" | sed 's/^/      doctor: /'
    # The exit code must agree with the lines: non-zero exactly when a check failed.
    if echo "$doctor_out" | grep -qi '\[fail\]'; then
        check "doctor on the simulated node: a failing check and a non-zero exit ($doctor_rc)" [ "$doctor_rc" -ne 0 ]
    else
        check "doctor on the simulated node: no failing check and exit 0" [ "$doctor_rc" -eq 0 ]
    fi
    check "doctor checks the kubelet socket and the agent" \
        sh -c "echo \"\$1\" | grep -q 'kubelet.sock answers' && echo \"\$1\" | grep -q 'registered with kubelet'" _ "$doctor_out"
    # With the shipped config (the NVML backend) on a machine without a driver it must fail.
    doctor_out=$(in_ct vgpu-agent doctor 2>&1)
    doctor_rc=$?
    echo "$doctor_out" | grep -v '\[ ok \]' | sed 's/^/      doctor: /'
    check "doctor with the shipped config and no driver: a failing check and a non-zero exit ($doctor_rc)" \
        sh -c "echo \"\$1\" | grep -qi '\[fail\]' && [ $doctor_rc -ne 0 ]" _ "$doctor_out"
else
    fail "vgpu-agent doctor exists"
fi

# ---------------------------------------------------------------------------------------
log "watchdog: a hung agent is killed and restarted"
pid_before=$(prop vgpu-agent.service MainPID)
restarts_before=$(prop vgpu-agent.service NRestarts)
in_ct kill -STOP "$pid_before"
restarted() {
    local now
    now=$(prop vgpu-agent.service MainPID)
    [ "$now" != 0 ] && [ "$now" != "$pid_before" ] && agent_active
}
if wait_for 30 restarted; then
    pass "the watchdog kills a hung agent (SIGSTOP) and systemd restarts it (PID $pid_before -> $(prop vgpu-agent.service MainPID))"
else
    fail "the watchdog kills a hung agent (SIGSTOP) and systemd restarts it" \
        "$(in_ct systemctl status vgpu-agent.service --no-pager 2>&1 | tail -n 10)"
fi
check "the journal names the watchdog" \
    in_ct sh -c "journalctl -u vgpu-agent.service --no-pager -o cat | grep -qi 'watchdog timeout'"
check "NRestarts went up" [ "$(prop vgpu-agent.service NRestarts)" -gt "$restarts_before" ]
wait_for 30 registered

# ---------------------------------------------------------------------------------------
log "bad config: a reload keeps the old one, a restart stops with exit 78"
in_ct cp /etc/vgpu/system-test.toml /etc/vgpu/system-test.toml.good
in_ct sed -i 's/^\[gpus\]$/[gpus]\nreplicas_per_gpu = 999/' /etc/vgpu/system-test.toml
pid_before=$(prop vgpu-agent.service MainPID)
in_ct systemctl reload vgpu-agent.service
sleep 2
check "a reload with a bad config keeps the agent running (same PID)" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl show -p MainPID --value vgpu-agent.service)\" = $pid_before ]"
in_ct systemctl restart vgpu-agent.service >/dev/null 2>&1
stopped_78() { [ "$(prop vgpu-agent.service ActiveState)" = failed ]; }
if wait_for 20 stopped_78; then
    pass "a bad config stops the agent (state failed)"
else
    fail "a bad config stops the agent (state failed)" "state: $(prop vgpu-agent.service ActiveState)"
fi
check "its exit status is 78" [ "$(prop vgpu-agent.service ExecMainStatus)" = 78 ]
restarts_before=$(prop vgpu-agent.service NRestarts)
sleep 3
check "no restart loop (3 s later: NRestarts still $restarts_before, still failed)" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl show -p NRestarts --value vgpu-agent.service)\" = $restarts_before ] && [ \"\$(nsenter -t $container_pid -a systemctl is-active vgpu-agent.service)\" = failed ]"
bad_message=$(in_ct journalctl -u vgpu-agent.service --no-pager -o cat -n 30 | grep -m1 'replicas_per_gpu')
echo "INFO  message: $bad_message"
check "the journal says which key is wrong and why" \
    sh -c "echo '$bad_message' | grep -q 'system-test.toml' && echo '$bad_message' | grep -q '999'"
in_ct mv /etc/vgpu/system-test.toml.good /etc/vgpu/system-test.toml
in_ct systemctl reset-failed vgpu-agent.service
in_ct systemctl start vgpu-agent.service
check "with the config fixed it starts again" wait_for 30 registered

# ---------------------------------------------------------------------------------------
log "upgrade: the agent restarts, the MPS daemons keep running"
# A stand-in MPS daemon under the real template: the driver condition lifted and the
# fake control program configured, by a runtime drop-in.
in_ct sh -c "cat > /run/systemd/system/vgpu-mps@.service.d/system-test.conf" <<'EOF'
[Service]
ExecCondition=
Environment=VGPU_CONFIG=/etc/vgpu/system-test-mps.toml
EOF
in_ct systemctl daemon-reload
in_ct systemctl start "vgpu-mps@$GPU0.service"
mps_running() { [ "$(prop "vgpu-mps@$GPU0.service" SubState)" = running ]; }
if wait_for 15 mps_running; then
    pass "a stand-in MPS daemon runs as vgpu-mps@$GPU0"
else
    fail "a stand-in MPS daemon runs as vgpu-mps@$GPU0" \
        "$(in_ct systemctl status "vgpu-mps@$GPU0.service" --no-pager 2>&1 | tail -n 12)"
fi
mps_pid=$(prop "vgpu-mps@$GPU0.service" MainPID)
# Type=exec counts the unit as running once the launcher is exec'd; the launcher then
# execs Python, which execs the control program in the same process.
check "the unit's main process becomes the control program itself (PID $mps_pid)" \
    wait_for 15 in_ct grep -q fake_mps_control "/proc/$mps_pid/cmdline"
check "it answers on its control pipe" \
    wait_for 15 in_ct sh -c "echo get_default_active_thread_percentage | CUDA_MPS_PIPE_DIRECTORY=/run/nvidia-mps/$GPU0 /usr/local/lib/vgpu-systest/nvidia-cuda-mps-control | grep -q '^100'"
agent_pid=$(prop vgpu-agent.service MainPID)
check "apt-get upgrades to the current build ($(basename "$DEB_NEW"))" \
    in_ct apt-get install -y -q --no-install-recommends /mnt/dist/new.deb
check "the new version is installed" \
    sh -c "nsenter -t $container_pid -a dpkg-query -W -f '\${Version}' vgpu-agent | grep -qx '$(dpkg-deb -f "$DEB_NEW" Version)'"
wait_for 30 agent_active
new_agent_pid=$(prop vgpu-agent.service MainPID)
check "the upgrade restarted the agent (PID $agent_pid -> $new_agent_pid)" \
    sh -c "[ '$new_agent_pid' != 0 ] && [ '$new_agent_pid' != '$agent_pid' ]"
check "the MPS daemon survived the upgrade (PID $mps_pid -> $(prop "vgpu-mps@$GPU0.service" MainPID))" \
    sh -c "[ \"\$(nsenter -t $container_pid -a systemctl show -p MainPID --value vgpu-mps@$GPU0.service)\" = $mps_pid ] && nsenter -t $container_pid -a kill -0 $mps_pid"
check "the agent registers again after the upgrade" wait_for 30 registered

# ---------------------------------------------------------------------------------------
log "remove and purge"
in_ct systemctl stop kubelet-standin.service >/dev/null 2>&1
check "apt-get remove" in_ct apt-get remove -y -q vgpu-agent
check "remove stopped the agent and the MPS daemon" \
    sh -c "! nsenter -t $container_pid -a systemctl is-active -q vgpu-agent.service && ! nsenter -t $container_pid -a systemctl is-active -q vgpu-mps@$GPU0.service && ! nsenter -t $container_pid -a kill -0 $mps_pid 2>/dev/null"
check "remove left no package files but the conffile" \
    in_ct sh -c '[ ! -e /usr/lib/vgpu-agent ] && [ ! -e /usr/bin/vgpu-agent ] && [ ! -e /lib/systemd/system/vgpu-agent.service ] && [ -f /etc/vgpu/config.toml ]'
check "apt-get purge" in_ct apt-get purge -y -q vgpu-agent
# The test's own files (drop-ins in /run, the fake) go first, then look for anything left.
# man-db's cache of formatted pages (from systemd-analyze verify's man check) is man-db's
# to expire, not the package's.
in_ct rm -rf /run/systemd/system/vgpu-agent.service.d /run/systemd/system/vgpu-mps@.service.d \
    /usr/local/lib/vgpu-systest
in_ct systemctl daemon-reload
in_ct systemctl reset-failed >/dev/null 2>&1
leftovers=$(in_ct sh -c 'find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /mnt -o -path /var/cache/man \) -prune -o \( -iname "*vgpu*" -o -name "nvidia-mps" \) -print 2>/dev/null; ls /var/lib/kubelet/device-plugins/vgpu.sock 2>/dev/null; dpkg -l vgpu-agent 2>/dev/null | grep "^[a-z][a-z] "; ps -eo pid,args | grep -E "vgpu|fake_mps" | grep -v grep; systemctl list-units --all --no-legend "vgpu*" | grep .')
if [ -z "$leftovers" ]; then
    pass "purge left nothing behind (files, units, processes, dpkg state)"
else
    # shellcheck disable=SC2206
    IFS=$'\n' lines=($leftovers)
    fail "purge left nothing behind (files, units, processes, dpkg state)" "${lines[@]}"
fi

# ---------------------------------------------------------------------------------------
echo
if [ "$failed" -eq 0 ]; then
    echo "system test: PASSED ($passed checks)"
else
    echo "system test: FAILED ($failed of $((passed + failed)) checks failed)"
    for name in "${failures[@]}"; do echo "  - $name"; done
    echo "--- agent journal (last 40 lines) ---"
    in_ct journalctl -u vgpu-agent.service --no-pager -n 40 -o short-monotonic 2>&1 | cat
    exit 1
fi
