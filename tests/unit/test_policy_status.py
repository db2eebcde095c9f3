"""Policy status without I/O: the Accepted condition a verdict gives, when nothing is to be
written, lastTransitionTime kept; the Lease decisions; the status config keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from proxy.config import settings_from_mapping
from proxy.control.kube.client import KubeClient
from proxy.control.kube.config import ClusterConfig
from proxy.control.kube.lease import LeaseRecord, LeaseTiming, Step, holder_identity, next_step
from proxy.control.kube.runtime import DEFAULT_LEASE_NAMESPACE, StatusWriting
from proxy.control.kube.status import (
    ACCEPTED,
    FAIL_CLOSED_NOTE,
    MAX_CONDITION_MESSAGE_CHARS,
    AcceptedReason,
    PolicyStatusWriter,
    StatusTarget,
    Verdict,
    desired_status,
)
from proxy.errors import ConfigError, ConfigIssue

T0 = "2026-01-01T00:00:00Z"
T1 = "2026-01-02T00:00:00Z"
ISSUE = ConfigIssue(
    file="EgressPolicy team/web",
    document=None,
    path="spec.rules[0].to[0].fqdn",
    message="'*.com' is too wide",
    fix="name a domain under the TLD",
)
INVALID = Verdict.refused(AcceptedReason.INVALID, [ISSUE])
VALID = Verdict.valid()


def accepted(
    status: str, reason: str, message: str, generation: int, at: str = T0
) -> dict[str, Any]:
    return {
        "type": ACCEPTED,
        "status": status,
        "reason": reason,
        "message": message,
        "observedGeneration": generation,
        "lastTransitionTime": at,
    }


VALID_AT_2 = {"observedGeneration": 2, "conditions": [accepted("True", "Valid", VALID.message, 2)]}


def test_an_invalid_policy_gets_accepted_false_with_the_validators_rendered_issue() -> None:
    assert desired_status(None, INVALID, 1, T1) == {
        "observedGeneration": 1,
        "conditions": [
            accepted("False", "InvalidPolicy", f"{FAIL_CLOSED_NOTE}\n{ISSUE.render()}", 1, at=T1)
        ],
    }
    assert ISSUE.render() == (
        "EgressPolicy team/web: spec.rules[0].to[0].fqdn: '*.com' is too wide "
        "-- fix: name a domain under the TLD"
    )


@pytest.mark.parametrize(
    ("name", "current", "verdict", "generation", "expected_transition"),
    [
        ("same verdict, same generation: no write", VALID_AT_2, VALID, 2, None),
        ("new generation, still valid: time kept", VALID_AT_2, VALID, 3, T0),
        ("valid -> invalid: time moves", VALID_AT_2, INVALID, 2, T1),
        ("no status yet", None, VALID, 2, T1),
        ("status not a mapping", "garbage", VALID, 2, T1),
        (
            "a field the proxy does not write: no write",
            {"observedGeneration": 2, "conditions": [{**VALID_AT_2["conditions"][0], "x": 1}]},
            VALID,
            2,
            None,
        ),
        (
            "top-level observedGeneration missing",
            {"conditions": VALID_AT_2["conditions"]},
            VALID,
            2,
            T0,
        ),
        (
            "another message, same status: time kept",
            {"observedGeneration": 2, "conditions": [accepted("False", "InvalidPolicy", "old", 2)]},
            INVALID,
            2,
            T0,
        ),
    ],
)
def test_when_status_is_written_and_with_which_transition_time(
    name: str,
    current: object,
    verdict: Verdict,
    generation: int,
    expected_transition: str | None,
) -> None:
    written = desired_status(current, verdict, generation, T1)
    if expected_transition is None:
        assert written is None, name
        return
    assert written is not None, name
    assert written["observedGeneration"] == generation
    (condition,) = written["conditions"]
    assert condition["lastTransitionTime"] == expected_transition, name
    assert condition["status"] == ("True" if verdict.accepted else "False")
    assert condition["observedGeneration"] == generation
    # What was written is, read back, up to date: no second write.
    assert desired_status(written, verdict, generation, "2030-01-01T00:00:00Z") is None


def test_a_condition_with_no_transition_time_is_rewritten() -> None:
    condition = dict(VALID_AT_2["conditions"][0])
    del condition["lastTransitionTime"]
    written = desired_status({"observedGeneration": 2, "conditions": [condition]}, VALID, 2, T1)
    assert written is not None and written["conditions"][0]["lastTransitionTime"] == T1


def test_conditions_of_other_types_are_kept_in_place() -> None:
    other = {
        "type": "Ready",
        "status": "True",
        "reason": "X",
        "message": "",
        "lastTransitionTime": T0,
    }
    current = {"conditions": [other, accepted("True", "Valid", VALID.message, 1)]}
    written = desired_status(current, INVALID, 2, T1)
    assert written is not None
    assert [c["type"] for c in written["conditions"]] == ["Ready", ACCEPTED]
    assert written["conditions"][0] == other


def test_a_long_message_is_cut_to_the_conditions_limit() -> None:
    issues = [ISSUE] * 1000
    verdict = Verdict.refused(AcceptedReason.INVALID, issues)
    assert len(verdict.message) == MAX_CONDITION_MESSAGE_CHARS
    assert verdict.message.endswith("...")


# --- the Lease --------------------------------------------------------------------------------

ME = "outgate-abc_1"


def record(holder: str, duration: float = 15) -> LeaseRecord:
    return LeaseRecord(holder=holder, duration_seconds=duration, renew_time=T0, transitions=0)


@pytest.mark.parametrize(
    ("lease", "unchanged_for", "step"),
    [
        (None, 0.0, Step.CREATE),
        (record(ME), 0.0, Step.RENEW),
        (record(ME), 100.0, Step.RENEW),  # ours, even if we were slow
        (record("other"), 0.0, Step.WAIT),
        (record("other"), 14.9, Step.WAIT),
        (record("other"), 15.0, Step.TAKE_OVER),  # unchanged for a whole duration, by our clock
        (record(""), 0.0, Step.TAKE_OVER),  # released
        (record("other", duration=0), 0.0, Step.TAKE_OVER),  # no duration: nothing to honour
    ],
)
def test_lease_steps(lease: LeaseRecord | None, unchanged_for: float, step: Step) -> None:
    assert next_step(lease, ME, unchanged_for=unchanged_for) is step


def test_a_lease_record_is_read_defensively() -> None:
    assert LeaseRecord.from_object({}) == LeaseRecord(
        holder="", duration_seconds=0.0, renew_time="", transitions=0
    )
    spec = {"holderIdentity": "a", "leaseDurationSeconds": 15, "leaseTransitions": 2}
    assert LeaseRecord.from_object({"spec": spec}).transitions == 2


def test_every_process_is_a_distinct_holder_named_after_its_pod() -> None:
    first, second = (
        holder_identity({"POD_NAME": "outgate-7d9"}),
        holder_identity({"POD_NAME": "outgate-7d9"}),
    )
    assert first.startswith("outgate-7d9_") and second.startswith("outgate-7d9_")
    assert first != second


# --- config -----------------------------------------------------------------------------------


def settings(raw: dict[str, Any]) -> Any:
    return settings_from_mapping(raw, file="outgate.yaml", base_dir=Path())


def test_status_writing_is_on_with_policies_from_the_cluster_and_can_be_turned_off() -> None:
    assert StatusWriting.from_settings(settings({}), {}) is None  # no cluster policies
    on = StatusWriting.from_settings(settings({"policies": {"kubernetes": True}}), {})
    assert on is not None
    assert (on.lease_namespace, on.lease_name) == (DEFAULT_LEASE_NAMESPACE, "outgate-policy-status")
    off = settings({"policies": {"kubernetes": True, "status": {"write": False}}})
    assert StatusWriting.from_settings(off, {}) is None


def test_the_lease_namespace_is_the_configured_one_else_the_pods() -> None:
    raw: dict[str, Any] = {"policies": {"kubernetes": True}}
    env = {"POD_NAMESPACE": "egress", "POD_NAME": "outgate-1"}
    found = StatusWriting.from_settings(settings(raw), env)
    assert found is not None and found.lease_namespace == "egress"
    assert found.identity.startswith("outgate-1_")
    raw["policies"]["status"] = {"leaseNamespace": "ops", "leaseName": "status.lock"}
    found = StatusWriting.from_settings(settings(raw), env)
    assert found is not None and (found.lease_namespace, found.lease_name) == ("ops", "status.lock")


@pytest.mark.parametrize(
    ("key", "value", "fix_mentions"),
    [
        ("write", "yes", "true or false"),
        ("leaseName", "Outgate_Status", "object name"),
        ("leaseNamespace", "a.b", "namespace"),
        ("writesPerSecond", 0, "rate"),
        ("leaseTime", 5, "did you mean"),
    ],
)
def test_bad_status_keys_are_refused_with_the_field_and_a_fix(
    key: str, value: object, fix_mentions: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        settings({"policies": {"kubernetes": True, "status": {key: value}}})
    (issue,) = caught.value.issues
    assert issue.path == f"policies.status.{key}"
    assert fix_mentions in issue.fix


# --- the writer's queue and the holder's right to act ------------------------------------------


class Subjects:
    def __init__(self, keys: list[str]) -> None:
        self.keys = keys

    def status_keys(self) -> list[str]:
        return self.keys

    def status_target(self, key: str) -> StatusTarget | None:
        return None

    def status_written(self, key: str, sent_version: str, obj: dict[str, Any]) -> None:
        raise AssertionError("nothing is written here")


def writer(keys: list[str]) -> PolicyStatusWriter:
    client = KubeClient(ClusterConfig(server="https://127.0.0.1:1", ssl_context=None))
    return PolicyStatusWriter(client, Subjects(keys))


def test_the_queue_holds_each_object_once_however_often_it_changes() -> None:
    queue = writer(["a", "b"])
    queue.changed("a")
    assert queue.pending == 0  # not the holder: nothing is queued
    queue.set_active(True)
    assert queue.pending == 2  # the new holder looks at every object once
    for _ in range(10):
        queue.changed("a")
        queue.changed("c")
    assert queue.pending == 3
    queue.set_active(False)
    assert queue.pending == 0


@pytest.mark.parametrize(
    "timing",
    [
        {"renew_deadline": 15.0},  # a holder could act after another took over
        {"renew_period": 10.0},  # no second try before the deadline
        {"renew_period": 0.0},
    ],
)
def test_lease_timing_keeps_period_below_deadline_below_duration(timing: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        LeaseTiming(**timing)  # type: ignore[arg-type]
