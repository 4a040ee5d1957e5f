#!/bin/bash
# The system test's body (scripts/test-system prepares its inputs). Boots $ROOTFS with
# systemd-nspawn (systemd as PID 1; every change goes to a throw-away overlay) and checks
# the packages with the real systemctl and journalctl:
#   deb: install $DEB_OLD, run the agent (simulated GPUs, stand-in MPS daemons, a kubelet
#        stand-in), watchdog, bad config, upgrade to $DEB_NEW, remove, purge;
#   rpm: the same install, upgrade and erase with $RPM_OLD/$RPM_NEW, so the rpm's
#        scriptlets run under a real systemd too (skipped when RPM_OLD is empty).
# Prints one PASS/FAIL line per check and a summary; exits non-zero when a check failed.
# Each container is torn down however the test ends.
set -uo pipefail

: "${ROOTFS:?root filesystem to boot}" "${DEB_OLD:?previous .deb}" "${DEB_NEW:?current .deb}"
RPM_OLD=${RPM_OLD:-}
RPM_NEW=${RPM_NEW:-}
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
work=$(mktemp -d /tmp/vgpu-systest.XXXXXX)
passed=0
failed=0
failures=()
nspawn_pid=
container_pid=
phase=

# Simulated GPUs with fixed UUIDs, so the checks can name them; GPU_NONE is not served.
GPU0=GPU-00000000-0000-0000-0000-000000000001
GPU1=GPU-00000000-0000-0000-0000-000000000002
GPU_NONE=GPU-00000000-0000-0000-0000-000000000009
FAKE_MPS=/usr/local/lib/vgpu-systest/nvidia-cuda-mps-control
# How the agent gets its MPS daemons. "systemd" (the packaged default) makes the agent
# start the vgpu-mps@ units itself (with simulated GPUs it does so because the config
# names the stand-in control program); with "external" the test starts the units (the
# same template, the fake control program as the daemon) and the agent uses and watches them.
MPS_MANAGER=${MPS_MANAGER:-systemd}

log() { echo "test-system: $*" >&2; }

pass() {
    passed=$((passed + 1))
    echo "PASS  [$phase] $1"
}

fail() {
    failed=$((failed + 1))
    failures+=("[$phase] $1")
    echo "FAIL  [$phase] $1"
    shift
    local line
    for line in "$@"; do echo "      $line"; done
}

info() { echo "INFO  [$phase] $*"; }

# Run a command inside the container (all its namespaces) with a clean environment.
in_ct() {
    nsenter -t "$container_pid" -a \
        env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 SYSTEMD_PAGER= \
        DEBIAN_FRONTEND=noninteractive SYSTEMD_COLORS=0 "$@"
}

# check NAME COMMAND...: PASS when the command succeeds, else FAIL with its output.
check() {
    local name=$1 output
    shift
    if output=$("$@" 2>&1); then
        pass "$name"
    else
        local lines
        mapfile -t lines < <(echo "$output" | tail -n 15)
        fail "$name" "${lines[@]}"
    fi
}

# wait_for SECONDS COMMAND...: poll until the command succeeds; status 1 on timeout.
wait_for() {
    local deadline=$((SECONDS + $1))
    shift
    while ! "$@" >/dev/null 2>&1; do
        [ "$SECONDS" -ge "$deadline" ] && return 1
        sleep 0.2
    done
}

prop() { in_ct systemctl show -p "$2" --value "$1"; }
is_prop() { [ "$(prop "$1" "$2")" = "$3" ]; }
mps_unit() { echo "vgpu-mps@$1.service"; }
agent_active() { is_prop vgpu-agent.service ActiveState active && is_prop vgpu-agent.service SubState running; }
registered() { prop vgpu-agent.service StatusText | grep -q "registered with kubelet"; }
pid_alive() { in_ct kill -0 "$1" 2>/dev/null; }
mps_answers() {
    in_ct sh -c "echo get_default_active_thread_percentage | CUDA_MPS_PIPE_DIRECTORY=/run/nvidia-mps/$1 $FAKE_MPS | grep -q '^100'"
}

stop_container() {
    if [ -n "$nspawn_pid" ] && kill -0 "$nspawn_pid" 2>/dev/null; then
        # SIGTERM asks nspawn to halt the container cleanly; KILL if that takes too long.
        kill -TERM "$nspawn_pid" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$nspawn_pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$nspawn_pid" 2>/dev/null && kill -KILL "$nspawn_pid" 2>/dev/null
        wait "$nspawn_pid" 2>/dev/null
    fi
    nspawn_pid=
    container_pid=
}

teardown() {
    local status=$?
    stop_container
    mountpoint -q "$work/image/root" 2>/dev/null && umount "$work/image/root"
    rm -rf "$work"
    exit "$status"
}
trap teardown EXIT
trap 'exit 130' INT TERM

# Boot a container: a fresh one from $ROOTFS (its changes kept in a throw-away overlay),
# or, given a second argument, that directory as it is. /mnt/pkgs and /mnt/fakes are
# read-only binds.
boot_container() {
    local machine=vgpu-systest-$$-$1
    local root=(-D "$ROOTFS" --volatile=overlay)
    [ -n "${2:-}" ] && root=(-D "$2")
    systemd-nspawn "${root[@]}" -M "$machine" \
        --bind-ro="$work/pkgs:/mnt/pkgs" --bind-ro="$work/fakes:/mnt/fakes" \
        -b --register=no --keep-unit --console=pipe >"$work/console-$1.log" 2>&1 </dev/null &
    nspawn_pid=$!
    # PID 1 is nspawn's child once that child has become systemd (before, it is
    # nspawn's own set-up process).
    for _ in $(seq 300); do
        container_pid=$(awk '{print $1}' "/proc/$nspawn_pid/task/$nspawn_pid/children" 2>/dev/null)
        if [ -n "$container_pid" ] && [ "$(cat "/proc/$container_pid/comm" 2>/dev/null)" = systemd ]; then
            break
        fi
        container_pid=
        sleep 0.1
    done
    local state=
    if [ -n "$container_pid" ]; then
        wait_for 60 in_ct systemctl is-system-running --quiet --wait
        state=$(in_ct systemctl is-system-running 2>&1)
    fi
    # "degraded" (some unrelated unit failed) still has a working PID 1.
    if [ "$state" != running ] && [ "$state" != degraded ]; then
        fail "container boots with systemd as PID 1" "state: ${state:-no PID 1}" \
            "$(tail -n 20 "$work/console-$1.log")"
        return 1
    fi
    pass "container boots with systemd as PID 1 ($(in_ct systemctl --version | head -n 1))"
}

# Test set-up inside the container, all outside the package's files: a config with
# simulated GPUs whose MPS daemons are the fake control program, and runtime drop-ins (in
# /run, gone with the container): a short watchdog for the agent, the config for the MPS
# units, and for the served GPUs only, the driver check lifted. (Drop-ins of a template
# and of its instance need different file names, or the instance's hides the template's.)
set_up_node() {
    in_ct mkdir -p /etc/vgpu /usr/local/lib/vgpu-systest /run/systemd/system/vgpu-agent.service.d \
        /run/systemd/system/vgpu-mps@.service.d \
        "/run/systemd/system/$(mps_unit $GPU0).d" "/run/systemd/system/$(mps_unit $GPU1).d"
    in_ct sh -c "cat > /etc/vgpu/system-test.toml" <<EOF
version = 1
[gpus]
backend = "simulated"
compute_mode = "unchanged"
[mps]
manager = "$MPS_MANAGER"
control_binary = "$FAKE_MPS"
[[simulated.gpus]]
uuid = "$GPU0"
[[simulated.gpus]]
uuid = "$GPU1"
EOF
    in_ct cp /mnt/fakes/fake_mps_control.py /usr/local/lib/vgpu-systest/
    in_ct sh -c "printf '%s\n' '#!/bin/sh' 'exec /usr/bin/python3 /usr/local/lib/vgpu-systest/fake_mps_control.py \"\$@\"' > $FAKE_MPS && chmod 0755 $FAKE_MPS"
    in_ct sh -c "cat > /run/systemd/system/vgpu-agent.service.d/system-test.conf" <<'EOF'
[Service]
Environment=VGPU_CONFIG=/etc/vgpu/system-test.toml
WatchdogSec=3s
RestartSec=1s
EOF
    in_ct sh -c "cat > /run/systemd/system/vgpu-mps@.service.d/system-test-config.conf" <<'EOF'
[Service]
Environment=VGPU_CONFIG=/etc/vgpu/system-test.toml
EOF
    local gpu
    for gpu in $GPU0 $GPU1; do
        in_ct sh -c "printf '[Service]\nExecCondition=\n' > /run/systemd/system/$(mps_unit "$gpu").d/system-test-driver.conf"
    done
}

# With MPS_MANAGER=external the daemons are started here, as an operator would, before
# the agent (it takes a daemon that does not answer at its start as a failed GPU).
start_mps_units() {
    [ "$MPS_MANAGER" = external ] || return 0
    in_ct systemctl start "$(mps_unit $GPU0)" "$(mps_unit $GPU1)"
    wait_for 15 mps_answers $GPU0
    wait_for 15 mps_answers $GPU1
}

# The kubelet stand-in: a transient unit running the stand-in module from the package's
# private directory with the package's interpreter.
start_kubelet_standin() {
    check "the kubelet stand-in starts" \
        in_ct systemd-run --unit=kubelet-standin --property=Type=exec \
        /usr/bin/python3.11 -I -S -c \
        'import runpy, sys; sys.path.insert(0, "/usr/lib/vgpu-agent"); sys.argv[0] = "kubelet-standin"; runpy.run_module("vgpu_agent.kubelet_standin", run_name="__main__")' \
        --plugin-dir /var/lib/kubelet/device-plugins
}

# Removes the test's own files, then lists whatever the package left behind.
leftovers() {
    in_ct systemctl stop kubelet-standin.service >/dev/null 2>&1
    in_ct rm -rf /run/systemd/system/vgpu-agent.service.d /run/systemd/system/vgpu-mps@.service.d \
        "/run/systemd/system/$(mps_unit $GPU0).d" "/run/systemd/system/$(mps_unit $GPU1).d" \
        /usr/local/lib/vgpu-systest /etc/vgpu/system-test.toml
    in_ct rmdir /etc/vgpu 2>/dev/null
    in_ct systemctl daemon-reload
    in_ct systemctl reset-failed >/dev/null 2>&1
    # man-db's cache of formatted pages (from systemd-analyze verify's man check) is
    # man-db's to expire, not the package's.
    in_ct sh -c 'find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /mnt -o -path /var/cache/man \) -prune -o \( -iname "*vgpu*" -o -name "nvidia-mps" \) -print 2>/dev/null
        ls /var/lib/kubelet/device-plugins/vgpu.sock 2>/dev/null
        ps -eo pid,args | grep -E "vgpu-agent|fake_mps" | grep -v grep
        systemctl list-units --all --no-legend "vgpu*" | grep .'
}

# ---------------------------------------------------------------------------------------
deb_phase() {
    phase=deb
    log "deb: booting a fresh container"
    boot_container deb || return
    set_up_node

    log "deb: installing the previous build"
    check "apt-get installs the previous build ($(basename "$DEB_OLD"))" \
        in_ct apt-get install -y -q --no-install-recommends /mnt/pkgs/old.deb
    if [ "$MPS_MANAGER" = external ]; then
        # The install started the agent before any daemon ran; start them, then the agent.
        start_mps_units
        in_ct systemctl restart vgpu-agent.service
    fi
    check "vgpu-agent.service is enabled on install" is_prop vgpu-agent.service UnitFileState enabled
    # shellcheck disable=SC2016 # expanded by the container's shell
    check "systemd-analyze verify is clean for every unit" \
        in_ct sh -c 'out=$(systemd-analyze verify /lib/systemd/system/vgpu-agent.service /lib/systemd/system/vgpu-compute-mode.service /lib/systemd/system/vgpu-mps@.service 2>&1); echo "$out"; [ -z "$out" ]'
    local unit exposure
    for unit in vgpu-agent.service vgpu-compute-mode.service "$(mps_unit $GPU_NONE)"; do
        exposure=$(in_ct systemd-analyze security "$unit" 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
        info "systemd-analyze security $unit: exposure ${exposure:-unknown}"
    done
    exposure=$(in_ct systemd-analyze security vgpu-agent.service 2>/dev/null | sed -n 's/.*Overall exposure level for [^:]*: \([0-9.]*\).*/\1/p')
    check "the agent's exposure is 3.0 or lower (${exposure:-unknown})" \
        awk -v e="${exposure:-99}" 'BEGIN { exit !(e <= 3.0) }'

    if wait_for 30 agent_active; then
        pass "the agent is active (running) on simulated GPUs"
    else
        fail "the agent is active (running) on simulated GPUs" \
            "$(in_ct systemctl status vgpu-agent.service --no-pager -l 2>&1 | tail -n 15)"
    fi
    # The launcher isolates the agent: its grpc comes from the private directory, and the
    # one distribution package it takes is systemd-python (python3-systemd is installed).
    local agent_maps
    agent_maps=$(in_ct cat "/proc/$(prop vgpu-agent.service MainPID)/maps")
    check "the agent runs the private grpcio (/usr/lib/vgpu-agent)" \
        grep -q '/usr/lib/vgpu-agent/grpc/_cython/cygrpc' <<<"$agent_maps"
    check "the agent uses the distribution's systemd-python" \
        grep -q '/usr/lib/python3/dist-packages/systemd/_journal' <<<"$agent_maps"
    local status_text
    status_text=$(prop vgpu-agent.service StatusText)
    info "STATUS before the kubelet exists: $status_text"
    check "STATUS says it waits for the kubelet" grep -qi 'waiting for kubelet' <<<"$status_text"

    local gpu
    for gpu in $GPU0 $GPU1; do
        check "$(mps_unit "$gpu") runs the fake MPS daemon, exec'd as the unit's main process" \
            wait_for 20 in_ct sh -c "pid=\$(systemctl show -p MainPID --value $(mps_unit "$gpu")); [ \"\$pid\" != 0 ] && grep -q fake_mps_control /proc/\$pid/cmdline"
        check "GPU $gpu's MPS daemon answers on /run/nvidia-mps/$gpu" wait_for 15 mps_answers "$gpu"
    done
    check "vgpu-compute-mode.service is skipped without an NVIDIA driver" \
        is_prop vgpu-compute-mode.service ConditionResult no
    check "its journal says there is no NVIDIA driver" \
        in_ct sh -c "journalctl -u vgpu-compute-mode.service --no-pager -o cat | grep -q 'no NVIDIA driver on this machine'"

    log "deb: kubelet stand-in"
    start_kubelet_standin
    if wait_for 30 registered; then
        pass "STATUS reports the registration"
    else
        fail "STATUS reports the registration" "STATUS: $(prop vgpu-agent.service StatusText)" \
            "$(in_ct journalctl -u kubelet-standin -u vgpu-agent --no-pager -n 20 2>&1)"
    fi
    status_text=$(prop vgpu-agent.service StatusText)
    info "STATUS: $status_text"
    check "STATUS says what a person expects" \
        grep -qx 'serving 20 vGPUs on 2 GPUs as eks.amazonaws.com/vgpu; registered with kubelet' <<<"$status_text"
    standin_saw() { in_ct journalctl -u kubelet-standin --no-pager -o cat | grep -q "$1"; }
    check "the kubelet stand-in recorded the registration" \
        wait_for 10 standin_saw "registered eks.amazonaws.com/vgpu"
    # With daemons that came up after the agent, the liveness checks make them healthy.
    check "the kubelet stand-in got 20 healthy vGPUs" wait_for 20 standin_saw " healthy=20 "
    info "kubelet stand-in: $(in_ct journalctl -u kubelet-standin --no-pager -o cat | tail -n 3 | tr '\n' '|')"
    check "vgpu-agent status lists both GPUs" \
        in_ct sh -c "out=\$(vgpu-agent status 2>&1); echo \"\$out\"; echo \"\$out\" | grep -q $GPU0 && echo \"\$out\" | grep -q $GPU1"
    check "journald holds the agent's structured fields (GPU_UUID, VGPU_EVENT)" \
        in_ct sh -c "out=\$(journalctl -u vgpu-agent.service -o json --no-pager); echo \"\$out\" | grep -q '\"GPU_UUID\":\"$GPU0\"' && echo \"\$out\" | grep -q '\"VGPU_EVENT\"'"
    info "events in the journal:$(in_ct journalctl -u vgpu-agent.service -o json --no-pager | grep -o '"VGPU_EVENT":"[^"]*"' | sort | uniq -c | tr -s ' \n' ' ')"

    log "deb: MPS template without a driver"
    in_ct systemctl start "$(mps_unit $GPU_NONE)" >/dev/null 2>&1
    sleep 2
    check "vgpu-mps@ is skipped cleanly without an NVIDIA driver (inactive, not failed, not restarted)" \
        sh -c "[ \"\$1\" = no ] && [ \"\$2\" = inactive ] && [ \"\$3\" = 0 ]" _ \
        "$(prop "$(mps_unit $GPU_NONE)" ConditionResult)" "$(prop "$(mps_unit $GPU_NONE)" ActiveState)" \
        "$(prop "$(mps_unit $GPU_NONE)" NRestarts)"
    check "systemctl status says there is no NVIDIA driver" \
        in_ct sh -c "systemctl status $(mps_unit $GPU_NONE) --no-pager 2>&1 | grep -q 'no NVIDIA driver on this machine (/dev/nvidiactl is missing)'"
    info "$(in_ct journalctl -u "$(mps_unit $GPU_NONE)" --no-pager -o cat | grep -m1 'NVIDIA driver')"

    log "deb: vgpu-agent doctor"
    local doctor_out doctor_rc
    doctor_out=$(in_ct env VGPU_CONFIG=/etc/vgpu/system-test.toml vgpu-agent doctor 2>&1)
    doctor_rc=$?
    local doctor_lines
    mapfile -t doctor_lines <<<"$doctor_out"
    printf '      doctor: %s\n' "${doctor_lines[@]}"
    # The exit code must agree with the lines: non-zero exactly when a check failed.
    if grep -qi '\[fail\]' <<<"$doctor_out"; then
        check "doctor on the simulated node: a failing check and a non-zero exit ($doctor_rc)" [ "$doctor_rc" -ne 0 ]
    else
        check "doctor on the simulated node: no failing check and exit 0" [ "$doctor_rc" -eq 0 ]
    fi
    check "doctor finds the kubelet, the agent and both MPS daemons" \
        sh -c "echo \"\$1\" | grep -q 'kubelet.sock answers' && echo \"\$1\" | grep -q 'registered with kubelet' && [ \$(echo \"\$1\" | grep -ci 'mps daemon.*answers') -ge 2 ]" _ "$doctor_out"
    # With the shipped config (the NVML backend) on a machine without a driver it must fail.
    doctor_out=$(in_ct vgpu-agent doctor 2>&1)
    doctor_rc=$?
    grep -v '\[ ok \]' <<<"$doctor_out" | sed 's/^/      doctor: /'
    check "doctor with the shipped config and no driver: a failing check and a non-zero exit ($doctor_rc)" \
        sh -c "echo \"\$1\" | grep -qi '\[fail\]' && [ $doctor_rc -ne 0 ]" _ "$doctor_out"

    log "deb: watchdog"
    local pid_before restarts_before mps0_pid mps1_pid
    mps0_pid=$(prop "$(mps_unit $GPU0)" MainPID)
    mps1_pid=$(prop "$(mps_unit $GPU1)" MainPID)
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
    check "the agent's restart left the MPS daemons alone" \
        sh -c "[ \"\$1\" = $mps0_pid ] && [ \"\$2\" = $mps1_pid ]" _ \
        "$(prop "$(mps_unit $GPU0)" MainPID)" "$(prop "$(mps_unit $GPU1)" MainPID)"
    wait_for 30 registered

    log "deb: bad config"
    in_ct cp /etc/vgpu/system-test.toml /etc/vgpu/system-test.toml.good
    in_ct sed -i 's/^\[gpus\]$/[gpus]\nreplicas_per_gpu = 999/' /etc/vgpu/system-test.toml
    pid_before=$(prop vgpu-agent.service MainPID)
    in_ct systemctl reload vgpu-agent.service
    sleep 2
    check "a reload with a bad config keeps the agent running on the old one (same PID)" \
        is_prop vgpu-agent.service MainPID "$pid_before"
    in_ct systemctl restart vgpu-agent.service >/dev/null 2>&1
    if wait_for 20 is_prop vgpu-agent.service ActiveState failed; then
        pass "a restart with a bad config stops the agent (state failed)"
    else
        fail "a restart with a bad config stops the agent (state failed)" \
            "state: $(prop vgpu-agent.service ActiveState)"
    fi
    check "its exit status is 78" is_prop vgpu-agent.service ExecMainStatus 78
    restarts_before=$(prop vgpu-agent.service NRestarts)
    sleep 3
    check "no restart loop (3 s later: NRestarts still $restarts_before, still failed)" \
        sh -c "[ \"\$1\" = $restarts_before ] && [ \"\$2\" = failed ]" _ \
        "$(prop vgpu-agent.service NRestarts)" "$(prop vgpu-agent.service ActiveState)"
    local bad_message
    bad_message=$(in_ct journalctl -u vgpu-agent.service --no-pager -o cat -n 30 | grep 'config error' | tail -n 1)
    info "message: $bad_message"
    check "the journal names the file, the key and the bad value" \
        sh -c "echo \"\$1\" | grep -q 'system-test.toml' && echo \"\$1\" | grep -q 'replicas_per_gpu' && echo \"\$1\" | grep -q 999" _ "$bad_message"
    in_ct mv /etc/vgpu/system-test.toml.good /etc/vgpu/system-test.toml
    in_ct systemctl reset-failed vgpu-agent.service
    in_ct systemctl start vgpu-agent.service
    check "with the config fixed it starts again" wait_for 30 registered

    log "deb: upgrade"
    local agent_pid new_agent_pid
    agent_pid=$(prop vgpu-agent.service MainPID)
    check "apt-get upgrades to the current build ($(basename "$DEB_NEW"))" \
        in_ct apt-get install -y -q --no-install-recommends /mnt/pkgs/new.deb
    # shellcheck disable=SC2016 # a dpkg-query format, not a shell expansion
    check "the new version is installed" \
        sh -c "[ \"\$1\" = '$(dpkg-deb -f "$DEB_NEW" Version)' ]" _ \
        "$(in_ct dpkg-query -W -f '${Version}' vgpu-agent)"
    wait_for 30 agent_active
    new_agent_pid=$(prop vgpu-agent.service MainPID)
    check "the upgrade restarted the agent (PID $agent_pid -> $new_agent_pid)" \
        sh -c "[ '$new_agent_pid' != 0 ] && [ '$new_agent_pid' != '$agent_pid' ]"
    check "the MPS daemons survived the upgrade (PIDs $mps0_pid, $mps1_pid unchanged and alive)" \
        sh -c "[ \"\$1\" = $mps0_pid ] && [ \"\$2\" = $mps1_pid ]" _ \
        "$(prop "$(mps_unit $GPU0)" MainPID)" "$(prop "$(mps_unit $GPU1)" MainPID)"
    check "the agent registers again after the upgrade" wait_for 30 registered

    # ---- metrics, attribution and node labels (issue 15, from the obs branch) -----------
    # As an operator would: a drop-in that lets the agent listen on loopback (its sandbox
    # has no network otherwise), the nfd features directory, and the config keys.
    log "deb: metrics and node labels"
    check "the package bundles prometheus_client" \
        in_ct test -f /usr/lib/vgpu-agent/prometheus_client/exposition.py
    in_ct mkdir -p /etc/kubernetes/node-feature-discovery/features.d
    in_ct sh -c "cat > /run/systemd/system/vgpu-agent.service.d/system-test-metrics.conf" <<'EOF'
[Service]
PrivateNetwork=no
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
IPAddressAllow=localhost
EOF
    in_ct sh -c "cat >> /etc/vgpu/system-test.toml" <<'EOF'
[metrics]
enabled = true
listen_address = "127.0.0.1:9402"
textfile_path = "/run/vgpu-agent/vgpu.prom"
[labels]
enabled = true
EOF
    in_ct systemctl daemon-reload
    in_ct systemctl restart vgpu-agent.service
    check "the agent registers again with metrics and labels on" wait_for 30 registered
    scrape() {
        in_ct /usr/bin/python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("http://127.0.0.1:9402/metrics", timeout=5).read().decode())'
    }
    scrape_shows() { scrape 2>/dev/null | grep -qF "$1"; }
    check "GET /metrics shows GPU $GPU0's 10 allocatable vGPUs" \
        wait_for 20 scrape_shows "vgpu_vgpus{gpu_uuid=\"$GPU0\",state=\"allocatable\"} 10.0"
    check "GET /metrics shows the registration and GPU $GPU1's MPS daemon up" \
        bash -c 'grep -qx "vgpu_registered 1.0" <<<"$1" && grep -qF "vgpu_mps_daemon_up{gpu_uuid=\"$2\"} 1.0" <<<"$1"' \
        _ "$(scrape)" "$GPU1"
    info "metrics: $(scrape | grep -c '^vgpu_') samples"
    check "the textfile for node-exporter is written" \
        wait_for 20 in_ct grep -q '^vgpu_registered 1.0' /run/vgpu-agent/vgpu.prom
    check "the node-feature-discovery file labels 20 vGPUs shared through MPS" \
        in_ct sh -c 'f=/etc/kubernetes/node-feature-discovery/features.d/vgpu-agent; grep -qx "vgpu.eks.amazonaws.com/vgpu.count=20" $f && grep -qx "vgpu.eks.amazonaws.com/sharing-strategy=mps" $f'
    check "vgpu-agent status names the missing kubelet PodResources socket" \
        in_ct sh -c "vgpu-agent status 2>&1 | grep -q 'PodResources socket'"
    # ---- end of the metrics block --------------------------------------------------------

    log "deb: remove and purge"
    check "apt-get remove" in_ct apt-get remove -y -q vgpu-agent
    check "remove stopped the agent and both MPS daemons" \
        sh -c "! nsenter -t $container_pid -a systemctl is-active -q vgpu-agent.service && ! nsenter -t $container_pid -a kill -0 $mps0_pid 2>/dev/null && ! nsenter -t $container_pid -a kill -0 $mps1_pid 2>/dev/null"
    check "remove deleted the node-feature-discovery file (issue 15)" \
        in_ct test ! -e /etc/kubernetes/node-feature-discovery/features.d/vgpu-agent
    check "the MPS daemons were stopped through their control pipes (quit removed the sockets)" \
        in_ct sh -c "[ ! -e /run/nvidia-mps/$GPU0/control ] && [ ! -e /run/nvidia-mps/$GPU1/control ]"
    check "remove left no package files but the conffile" \
        in_ct sh -c '[ ! -e /usr/lib/vgpu-agent ] && [ ! -e /usr/bin/vgpu-agent ] && [ ! -e /lib/systemd/system/vgpu-agent.service ] && [ -f /etc/vgpu/config.toml ]'
    check "apt-get purge" in_ct apt-get purge -y -q vgpu-agent
    local left
    left=$(leftovers; in_ct sh -c 'dpkg -l vgpu-agent 2>/dev/null | grep "^[a-z][a-z] "')
    if [ -z "$left" ]; then
        pass "purge left nothing behind (files, units, processes, dpkg state)"
    else
        local lines
        mapfile -t lines <<<"$left"
        fail "purge left nothing behind (files, units, processes, dpkg state)" "${lines[@]}"
    fi
    dump_on_failure
    stop_container
}

# ---------------------------------------------------------------------------------------
# rpm: Amazon Linux 2023 is the rpm's target, but only a Debian root filesystem can be
# built here; the rpm's scriptlets (presets, enable, restart on upgrade, MPS daemons left
# alone, erase) only need systemd and rpm, so they run in the same container. --nodeps:
# the dependencies name Amazon Linux packages (python3.11 and glibc are there as debs).
rpm_phase() {
    phase=rpm
    log "rpm: booting a fresh container"
    boot_container rpm || return
    set_up_node
    local rpm=(rpm --nodeps)
    check "rpm installs the previous build ($(basename "$RPM_OLD"))" in_ct "${rpm[@]}" -i /mnt/pkgs/old.rpm
    check "the preset enabled vgpu-agent.service" is_prop vgpu-agent.service UnitFileState enabled
    # Like an image build: the unit is enabled, and the next boot would start it. The
    # scriptlets start nothing on a fresh install; start it as that boot would.
    start_mps_units
    in_ct systemctl start vgpu-agent.service
    check "the agent is active (running)" wait_for 30 agent_active
    start_kubelet_standin
    check "STATUS reports the registration" wait_for 30 registered
    local gpu
    for gpu in $GPU0 $GPU1; do
        check "GPU $gpu's MPS daemon answers" wait_for 20 mps_answers "$gpu"
    done
    local agent_pid mps0_pid mps1_pid
    agent_pid=$(prop vgpu-agent.service MainPID)
    mps0_pid=$(prop "$(mps_unit $GPU0)" MainPID)
    mps1_pid=$(prop "$(mps_unit $GPU1)" MainPID)
    check "rpm upgrades to the current build ($(basename "$RPM_NEW"))" in_ct "${rpm[@]}" -U /mnt/pkgs/new.rpm
    wait_for 30 agent_active
    check "the upgrade restarted the agent (PID $agent_pid -> $(prop vgpu-agent.service MainPID))" \
        sh -c "[ \"\$1\" != 0 ] && [ \"\$1\" != $agent_pid ]" _ "$(prop vgpu-agent.service MainPID)"
    check "the MPS daemons survived the upgrade (PIDs $mps0_pid, $mps1_pid)" \
        sh -c "[ \"\$1\" = $mps0_pid ] && [ \"\$2\" = $mps1_pid ]" _ \
        "$(prop "$(mps_unit $GPU0)" MainPID)" "$(prop "$(mps_unit $GPU1)" MainPID)"
    check "the agent registers again after the upgrade" wait_for 30 registered
    check "rpm erases the package" in_ct "${rpm[@]}" -e vgpu-agent
    check "erase stopped the agent and both MPS daemons" \
        sh -c "! nsenter -t $container_pid -a systemctl is-active -q vgpu-agent.service && ! nsenter -t $container_pid -a kill -0 $mps0_pid 2>/dev/null && ! nsenter -t $container_pid -a kill -0 $mps1_pid 2>/dev/null"
    local left
    left=$(leftovers; in_ct rpm -q vgpu-agent 2>/dev/null | grep -v 'not installed')
    if [ -z "$left" ]; then
        pass "erase left nothing behind (files, units, processes, rpm database)"
    else
        local lines
        mapfile -t lines <<<"$left"
        fail "erase left nothing behind (files, units, processes, rpm database)" "${lines[@]}"
    fi
    dump_on_failure
    stop_container
}

# ---------------------------------------------------------------------------------------
# Image build: install the package into a root filesystem where systemd is not running
# (as Packer or a chroot-based image build does), then boot it: the agent must start on
# its own. The root filesystem is an overlay of $ROOTFS kept across the two steps.
image_phase() {
    local kind=$1 image=$work/image
    phase=image-$kind
    log "$phase: install without a running systemd, then boot"
    mkdir -p "$image/upper" "$image/work" "$image/root"
    rm -rf "${image:?}/upper/"* "${image:?}/work/"*
    mount -t overlay overlay -o "lowerdir=$ROOTFS,upperdir=$image/upper,workdir=$image/work" "$image/root"
    # The node's config, baked into the image: simulated GPUs, MPS off (the other phases
    # cover MPS), read through a drop-in in /etc as an image would carry it.
    mkdir -p "$image/root/etc/vgpu" "$image/root/etc/systemd/system/vgpu-agent.service.d"
    printf 'version = 1\n[gpus]\nbackend = "simulated"\ncompute_mode = "unchanged"\n[mps]\nenabled = false\n' \
        > "$image/root/etc/vgpu/image-test.toml"
    printf '[Service]\nEnvironment=VGPU_CONFIG=/etc/vgpu/image-test.toml\n' \
        > "$image/root/etc/systemd/system/vgpu-agent.service.d/image-test.conf"
    local install=(apt-get install -y -q --no-install-recommends /mnt/pkgs/new.deb)
    [ "$kind" = rpm ] && install=(rpm -i --nodeps /mnt/pkgs/new.rpm)
    check "the $kind installs where systemd is not running" \
        systemd-nspawn -q -D "$image/root" --bind-ro="$work/pkgs:/mnt/pkgs" --register=no \
        --keep-unit --pipe env DEBIAN_FRONTEND=noninteractive "${install[@]}"
    check "vgpu-agent.service is enabled in the image" \
        test -L "$image/root/etc/systemd/system/multi-user.target.wants/vgpu-agent.service"
    if boot_container "image-$kind" "$image/root"; then
        check "on the image's first boot the agent starts by itself" wait_for 30 agent_active
        check "and reports its STATUS" \
            sh -c "nsenter -t $container_pid -a systemctl show -p StatusText --value vgpu-agent.service | grep -q 'serving 20 vGPUs on 2 GPUs'"
        check "vgpu-compute-mode.service ran at boot and was skipped (no driver)" \
            is_prop vgpu-compute-mode.service ConditionResult no
    fi
    dump_on_failure
    stop_container
    umount "$image/root"
}

dump_on_failure() {
    [ "$failed" -eq 0 ] && return
    echo "--- [$phase] agent journal (last 40 lines) ---"
    in_ct journalctl -u vgpu-agent.service -u 'vgpu-mps@*' --no-pager -n 40 -o short-monotonic 2>&1 | cat
}

# ---------------------------------------------------------------------------------------
mkdir -p "$work/pkgs" "$work/fakes"
cp "$DEB_OLD" "$work/pkgs/old.deb"
cp "$DEB_NEW" "$work/pkgs/new.deb"
if [ -n "$RPM_OLD" ]; then
    cp "$RPM_OLD" "$work/pkgs/old.rpm"
    cp "$RPM_NEW" "$work/pkgs/new.rpm"
fi
cp "$repo/tests/fakes/fake_mps_control.py" "$work/fakes/"

deb_phase
image_phase deb
if [ -n "$RPM_OLD" ]; then
    rpm_phase
    image_phase rpm
else
    log "rpm: skipped (no RPM_OLD)"
fi

echo
if [ "$failed" -eq 0 ]; then
    echo "system test: PASSED ($passed checks)"
else
    echo "system test: FAILED ($failed of $((passed + failed)) checks failed)"
    for name in "${failures[@]}"; do echo "  - $name"; done
    exit 1
fi
