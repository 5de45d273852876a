"""Placement groups that a dead actor created and Ray left behind are found and removed (pf_ray.launch.orphans)."""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.ray


def test_a_dead_actors_placement_group_is_removed_and_a_live_ones_kept(ray_session):
    import ray
    from ray.util.placement_group import placement_group

    from pf_ray.launch.orphans import job_placement_groups, orphaned_placement_groups, remove_orphaned_placement_groups

    @ray.remote(num_cpus=0)
    class Creator:  # what a Ray Train controller does: a placement group for its workers
        def create(self) -> str:
            group = placement_group([{"CPU": 0.01}])
            ray.get(group.ready())
            return group.id.hex()

    doomed, keeper = Creator.remote(), Creator.remote()
    doomed_group, kept_group = ray.get([doomed.create.remote(), keeper.create.remote()])
    ray.kill(doomed)  # as Tune ends a stopped trial's actor, and the controller with it
    deadline = time.monotonic() + 30
    while doomed_group not in {row.placement_group_id.hex() for row in orphaned_placement_groups()}:
        assert time.monotonic() < deadline, "the dead actor's placement group never showed as orphaned"
        time.sleep(0.2)
    assert kept_group not in {row.placement_group_id.hex() for row in orphaned_placement_groups()}

    assert remove_orphaned_placement_groups() >= 1
    left = {row.placement_group_id.hex() for row in job_placement_groups()}
    assert doomed_group not in left and kept_group in left  # the live actor's group is untouched
    ray.kill(keeper)


def test_a_placement_group_the_driver_created_is_never_an_orphan(ray_session):
    # Tune creates every trial's placement group from the driver: no creator actor, which the GCS reports as a
    # dead creator actor. Removing those kills every trial before it starts.
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from pf_ray.launch.orphans import orphaned_placement_groups

    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())
    try:
        assert group.id.hex() not in {row.placement_group_id.hex() for row in orphaned_placement_groups()}
    finally:
        remove_placement_group(group)
