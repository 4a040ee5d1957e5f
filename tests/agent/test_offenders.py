"""The offender policy (issue 20 item 2): faults named on one pod as their culprit within a
window make it an offender; it is held until hold_s after its last fault or until the pod
is gone; report mode holds nobody; a fault without a known pod UID counts for nobody."""

from __future__ import annotations

from typing import Optional

import pytest

from vgpu_agent.agent.offenders import OffenderPolicy
from vgpu_agent.config.schema import FaultsConfig
from vgpu_agent.model.pods import PodRef, PodsPresent

POD = PodRef("0a1b2c3d-0000-4000-8000-00000000000a", "team-a/trainer")
NEIGHBOUR = PodRef("0a1b2c3d-0000-4000-8000-00000000000b", "team-b/server")
GPU = "GPU-1"
#: The wall clock at the policy clock's 0.
WALL_AT_ZERO = 1_800_000_000.0


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _policy(clock: Clock, **settings: object) -> OffenderPolicy:
    # "hold" unless a test says otherwise: what these tests exercise (the default reports).
    settings.setdefault("offender_action", "hold")
    config = FaultsConfig(**settings)  # type: ignore[arg-type]
    return OffenderPolicy(config, clock=clock, wall_clock=lambda: WALL_AT_ZERO + clock.now)


def _faults(policy: OffenderPolicy, clock: Clock, pod: PodRef, times: list[float]) -> list[bool]:
    """Fault ``pod`` at each time; whether each fault made it an offender."""
    became = []
    for at in times:
        clock.now = at
        became.append(policy.fault(pod, GPU) is not None)
    return became


def test_repeat_limit_faults_within_the_window_hold_the_pod() -> None:
    """The third fault within 600 s holds the pod; its neighbour's faults count apart."""
    clock = Clock()
    policy = _policy(clock)
    assert _faults(policy, clock, POD, [0.0, 100.0]) == [False, False]
    assert _faults(policy, clock, NEIGHBOUR, [150.0, 160.0]) == [False, False]
    assert policy.held() == {}
    clock.now = 200.0
    offender = policy.fault(POD, GPU)
    assert offender is not None
    assert (offender.pod, offender.faults, offender.window_s, offender.held) == (
        POD,
        3,
        600.0,
        True,
    )
    assert policy.held() == {
        POD.uid: "the culprit of 3 MPS faults counted within 600 s (the last on GPU GPU-1); "
        "held until 2027-01-15T09:03:20Z"
    }
    assert [entry.pod for entry in policy.offenders()] == [POD]


def test_faults_older_than_the_window_do_not_count() -> None:
    """Faults spread wider than window_s never add up to the limit."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=2, window_s=60.0)
    assert _faults(policy, clock, POD, [0.0, 61.0, 122.0, 183.0]) == [False] * 4
    assert _faults(policy, clock, POD, [200.0]) == [True]


def test_a_hold_ends_hold_s_after_the_last_fault() -> None:
    """Held for hold_s; a fault while held restarts the hold; afterwards it must reach the
    limit again to be held again."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=2, hold_s=100.0)
    assert _faults(policy, clock, POD, [0.0, 10.0]) == [False, True]
    assert _faults(policy, clock, POD, [50.0]) == [False]
    clock.now = 149.0
    assert policy.expire(None) == []
    assert POD.uid in policy.held()
    clock.now = 150.0
    (release,) = policy.expire(None)
    assert (release.offender.pod, release.offender.faults) == (POD, 3)
    assert release.why == "100 s passed since its last fault (faults.hold_s)"
    assert policy.held() == {}
    assert _faults(policy, clock, POD, [151.0, 152.0]) == [False, True]


@pytest.mark.parametrize(
    ("present", "released"),
    [
        (None, False),
        (PodsPresent(age_s=0.0, pod_uids=frozenset({POD.uid})), False),
        (PodsPresent(age_s=30.0, pod_uids=frozenset()), False),
        (PodsPresent(age_s=0.0, pod_uids=frozenset({NEIGHBOUR.uid})), True),
    ],
    ids=["attribution-unknown", "still-there", "seen-before-the-hold", "gone"],
)
def test_hold_s_zero_holds_until_the_pod_is_gone(
    present: Optional[PodsPresent], released: bool
) -> None:
    """With hold_s = 0 a hold has no end in time; it ends once an attribution taken after
    the hold no longer has the pod (a snapshot older than the hold, or none, proves
    nothing)."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=1, hold_s=0.0)
    clock.now = 1000.0
    assert policy.fault(POD, GPU) is not None
    assert policy.held()[POD.uid].endswith("; held until the pod is gone")
    clock.now = 1020.0
    releases = policy.expire(present)
    assert [release.why for release in releases] == (["the pod is gone"] if released else [])
    assert (POD.uid in policy.held()) is not released


def test_a_pod_gone_is_released_before_its_hold_s() -> None:
    """A gone pod's hold ends even when hold_s has not passed: a new pod is a new tenant."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=1)
    assert policy.fault(POD, GPU) is not None
    clock.now = 5.0
    (release,) = policy.expire(PodsPresent(age_s=1.0, pod_uids=frozenset()))
    assert release.why == "the pod is gone"


def test_report_mode_holds_nobody_but_lists_the_offender() -> None:
    """offender_action = "report": the offender is listed, not held."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=1, offender_action="report")
    offender = policy.fault(POD, GPU)
    assert offender is not None
    assert not offender.held
    assert policy.held() == {}
    (shown,) = policy.describe()
    assert shown == {
        "pod": "team-a/trainer",
        "pod_uid": POD.uid,
        "gpu_uuid": GPU,
        "faults": 1,
        "window_s": 600.0,
        "held": False,
        "since": "2027-01-15T08:00:00Z",
        "until": "2027-01-15T09:00:00Z",
        "reason": "the culprit of 1 MPS faults counted within 600 s (the last on GPU GPU-1); "
        'not held (faults.offender_action = "report")',
    }


def test_a_culprit_without_a_pod_uid_counts_for_nobody() -> None:
    """A pod known by name only (the kubelet checkpoint unread) cannot be held by UID."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=1)
    assert policy.fault(PodRef("", "team-a/trainer"), GPU) is None
    assert policy.offenders() == []


def test_reloading_to_report_ends_every_hold_and_new_settings_count_from_now() -> None:
    """configure(): report mode releases the holds (listed, not held); a new hold_s applies
    to the holds there are."""
    clock = Clock()
    policy = _policy(clock, repeat_limit=1)
    assert policy.fault(POD, GPU) is not None
    assert policy.configure(FaultsConfig(repeat_limit=1, hold_s=10.0, offender_action="hold")) == []
    clock.now = 10.0
    assert [release.offender.pod for release in policy.expire(None)] == [POD]
    assert policy.fault(POD, GPU) is not None
    (release,) = policy.configure(FaultsConfig(offender_action="report"))
    assert (release.offender.pod, release.why) == (
        POD,
        'faults.offender_action is now "report"',
    )
    assert policy.held() == {}
    assert [entry.held for entry in policy.offenders()] == [False]
    assert policy.config.offender_action == "report"
