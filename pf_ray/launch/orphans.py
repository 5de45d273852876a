"""Placement groups left behind by Ray Train runs that Tune stopped: found and removed from the driver.

A trial with ``resources.workers_per_trial > 1`` runs a Ray Train run inside its Tune actor: the run's
``TrainController`` actor creates a placement group for its workers. When Tune stops the trial (ASHA, or the last
epoch's result) it ends the trial actor, the controller dies with it, and its placement group should go too. On
Ray 2.60 it does not (seen here: a ``CREATED`` group whose creator actor is dead and which is not detached), and
Train's own safety net, a detached ``PlacementGroupCleaner`` actor, asks the Ray State API whether the controller
is alive: that API is served by the dashboard, which pf-ray keeps off by default, so the cleaner only logs
"Failed to query Ray Train Controller actor state" for ever. The orphaned groups keep their CPUs reserved; the
next trials' worker groups then wait for resources that never come (the search, or the retrain after it, hangs).

``remove_orphaned_placement_groups`` reads the placement-group table from the GCS (no dashboard needed) and
removes every group of this job that is not detached and whose creator actor is dead: nothing alive can use it.
``OrphanReaper`` is a Tune callback that does so after every trial ends and, throttled, on Tune's loop.
"""

from __future__ import annotations

import logging
import time
from typing import Any

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 5.0  # on Tune's loop, look at most this often (a GCS table read each time)


def job_placement_groups() -> list[Any]:
    """This job's placement groups that are not detached and not removed (GCS table rows). Empty where the table
    cannot be read (a Ray whose private state API moved: logged once, nothing removed)."""
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2

    try:
        accessor = state._connect_and_get_accessor()
        rows = [gcs_pb2.PlacementGroupTableData.FromString(raw) for raw in accessor.get_placement_group_table()]
    except Exception as error:  # a private API: never let it break a search
        _warn_once(f"cannot read the placement-group table ({type(error).__name__}: {error}); orphaned Ray Train "
                   "placement groups will not be removed")
        return []
    job = ray.get_runtime_context().get_job_id()
    removed = gcs_pb2.PlacementGroupTableData.REMOVED
    return [row for row in rows if row.state != removed and not row.is_detached and row.creator_job_id.hex() == job]


def orphaned_placement_groups() -> list[Any]:
    """This job's placement groups, not detached, not removed, created by an actor that is dead. (A group the
    driver created, such as every Tune trial's, has no creator actor: the GCS marks its creator actor "dead" too,
    and it must be left alone.)"""
    import ray

    nil = ray.ActorID.nil().binary()
    return [row for row in job_placement_groups()
            if row.creator_actor_dead and row.creator_actor_id and row.creator_actor_id != nil]


def remove_orphaned_placement_groups() -> int:
    """Remove the groups ``orphaned_placement_groups`` finds; returns how many."""
    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    count = 0
    for row in orphaned_placement_groups():
        try:
            remove_placement_group(PlacementGroup(PlacementGroupID(row.placement_group_id)))
            count += 1
        except Exception as error:  # already gone, or the GCS said no: the next pass tries again
            logger.debug("could not remove placement group %s: %s", row.placement_group_id.hex(), error)
    if count:
        logger.info("removed %d placement group(s) left by stopped Ray Train runs", count)
    return count


def settle(timeout_s: float = 30.0, poll_s: float = 0.5) -> bool:
    """Before a run that needs the whole cluster (the retrain): remove orphans until none of this job's
    placement groups is left, or ``timeout_s`` passes (a trial actor still stopping). True if none is left."""
    deadline = time.monotonic() + timeout_s
    while True:
        remove_orphaned_placement_groups()
        if not job_placement_groups():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def orphan_reaper() -> Any:
    """A Tune callback that removes orphaned placement groups when a trial ends and, at most every
    ``REAP_INTERVAL_S``, on Tune's loop (Tune stops a trial's actor after its callbacks ran)."""
    from ray import tune

    class OrphanReaper(tune.Callback):
        def __init__(self) -> None:
            self.last = 0.0

        def _reap(self) -> None:
            self.last = time.monotonic()
            remove_orphaned_placement_groups()

        def on_step_end(self, iteration: int, trials: list, **info: Any) -> None:
            if time.monotonic() - self.last >= REAP_INTERVAL_S:
                self._reap()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._reap()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._reap()

    return OrphanReaper()
