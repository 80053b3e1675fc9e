"""Series completion rules and AI selection rules, on hand-made series states."""

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from dicomnode.assembler import completion_rule
from dicomnode.config import SeriesConfig
from dicomnode.rules import skip_reason, slice_normal_angle_deg
from storage.index import SeriesProgress
from storage.models import CompletionRule

T0 = datetime(2026, 1, 1, 8, 0, 0)
RULES = SeriesConfig(quiet_seconds=10, release_grace_seconds=2, max_wait_seconds=600)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def series(**kw: object) -> SeriesProgress:
    base = SeriesProgress(
        job_id=1, series_instance_uid="1.2", study_instance_uid="1.1", modality="CT",
        series_description="Chest 1.25mm", body_part_examined="CHEST",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"), image_orientation=AXIAL,
        slice_thickness_mm=1.25, instance_count=120, collecting_since=T0,
        last_received_at=T0, released_at=None,
    )
    return replace(base, **kw)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def test_quiet_period() -> None:
    assert completion_rule(series(), RULES, at(9.9)) is None
    assert completion_rule(series(), RULES, at(10)) == CompletionRule.QUIET


def test_release_shortens_the_wait_only_after_the_grace() -> None:
    released = series(released_at=at(0.5))
    assert completion_rule(released, RULES, at(1.9)) is None
    assert completion_rule(released, RULES, at(2.0)) == CompletionRule.RELEASE
    # a release recorded before the latest instance is stale: quiet period applies
    stale = series(released_at=T0 - timedelta(seconds=1))
    assert completion_rule(stale, RULES, at(5)) is None


def test_a_series_with_refused_instances_waits_for_them_until_the_deadline() -> None:
    """Instances refused for want of disk space: no quiet period or release completes the
    series (it would be analysed without them); the deadline skips it, saying why."""
    short = series(refused_instances=16, instance_count=14, released_at=at(0.5))
    assert completion_rule(short, RULES, at(599)) is None
    assert completion_rule(short, RULES, at(599), started_at=at(300)) is None  # after a restart
    assert completion_rule(short, RULES, at(600)) == CompletionRule.MAX_WAIT
    reason = skip_reason(short, RULES)
    assert reason is not None and reason.startswith("incomplete: 16 instance(s) refused")
    assert "send the series again" in reason
    assert completion_rule(replace(short, refused_instances=0), RULES, at(2)) == \
        CompletionRule.RELEASE  # sent again since: complete as usual


def test_after_a_restart_the_quiet_period_counts_from_the_start() -> None:
    """The node was down for an hour: the series is not completed the moment it starts
    (its sender may reconnect and go on), but a quiet period later."""
    started = at(3600)
    assert completion_rule(series(), RULES, at(3601), started) is None
    assert completion_rule(series(), RULES, at(3610), started) == CompletionRule.QUIET
    assert completion_rule(series(), RULES, at(3601)) == CompletionRule.MAX_WAIT  # no start


def test_after_a_restart_the_deadline_does_not_count_the_time_the_node_was_down() -> None:
    """The sender goes on after the restart: its first new instance must not close the
    series by a deadline that ran out while the node was down."""
    started = at(3600)
    going_on = series(last_received_at=at(3601))
    assert completion_rule(going_on, RULES, at(3602), started) is None
    assert completion_rule(going_on, RULES, at(3600 + 599), started) == CompletionRule.QUIET
    busy = series(last_received_at=at(4199.5))
    assert completion_rule(busy, RULES, at(4199.9), started) is None
    assert completion_rule(busy, RULES, at(4200), started) == CompletionRule.MAX_WAIT


def test_max_wait_is_a_hard_deadline() -> None:
    busy = series(last_received_at=at(599))
    assert completion_rule(busy, RULES, at(599.5)) is None
    assert completion_rule(busy, RULES, at(600)) == CompletionRule.MAX_WAIT


@pytest.mark.parametrize(
    ("change", "rule"),
    [
        ({"modality": "MR"}, "modalities"),
        ({"image_type": ("ORIGINAL", "PRIMARY", "LOCALIZER")}, "image_type_excludes"),
        ({"image_type": ("DERIVED", "SECONDARY")}, "image_type_excludes: ImageType contains "
                                                   "DERIVED, SECONDARY"),
        ({"instance_count": 12}, "min_slices: 12 instances, fewer than 40"),
        ({"slice_thickness_mm": 7.5}, "max_slice_thickness_mm: slices are 7.5 mm"),
        ({"image_orientation": (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)}, "require_axial: slices are "
                                                                  "tilted 90 degrees"),
        ({"image_orientation": ()}, "require_axial: no usable ImageOrientationPatient"),
        # one instance, no orientation of its own: the multi-frame rule speaks first
        ({"sop_classes": ("1.2.840.10008.5.1.4.1.1.2.1",), "instance_count": 1,
          "image_orientation": ()},
         "multi-frame CT (Enhanced CT Image Storage) is not supported: have the scanner or"
         " PACS send the series as CT Image Storage"),
    ],
)
def test_each_failing_rule_is_named(change: dict, rule: str) -> None:
    reason = skip_reason(series(**change), SeriesConfig())
    assert reason is not None and reason.startswith(rule.split(":")[0])
    assert rule in reason


def test_configurable_rules() -> None:
    rules = SeriesConfig(description_regex="lung|chest", body_part_regex="^chest$",
                         image_type_requires=["AXIAL"], modalities=["ct"])
    assert skip_reason(series(), rules) is None
    assert "description_regex" in skip_reason(series(series_description="Abdomen"), rules)
    assert "body_part_regex" in skip_reason(series(body_part_examined="HEAD"), rules)
    assert skip_reason(series(body_part_examined=""), rules) is None  # absent: not a reason
    assert "image_type_requires: ImageType lacks AXIAL" in skip_reason(
        series(image_type=("ORIGINAL", "PRIMARY")), rules)


def test_gantry_tilt_within_tolerance_is_axial() -> None:
    import math
    tilt = math.radians(5)
    orientation = (1.0, 0.0, 0.0, 0.0, math.cos(tilt), -math.sin(tilt))
    assert slice_normal_angle_deg(orientation) == pytest.approx(5.0)
    assert skip_reason(series(image_orientation=orientation), SeriesConfig()) is None
