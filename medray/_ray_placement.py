"""A workaround for a Ray limitation: the placement groups of trials that Ray Tune stopped are never removed.

Ray 2.60 (Ray Train V2 under Ray Tune): when ASHA stops a trial, Tune ends the trial's actor and with it the Ray
Train controller, but the worker group's placement group outlives them (it belongs to the job). Ray Train's own
cleanup goes through the dashboard's state API, which a plain `ray.init()` may not start; the group then keeps its
GPUs and CPUs reserved, and later trials wait for resources that never come back. So each trial's controller
records its placement group with a small actor of the search driver (`RecordPlacementGroup`), and a Tune callback
removes the groups of every trial that ended (`FreeTrialPlacementGroups`).

Re-check with every Ray upgrade after 2.60: if a stopped trial's placement group is gone without this module
(tests/test_search_e2e.py counts the cluster's free CPUs after a search), delete it. It imports Ray Train's private
`ray.train.v2._internal.execution.callback.WorkerGroupCallback`, the only hook that sees the worker group.
"""

from __future__ import annotations

import hashlib
import logging
import time

import ray
from ray import tune
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.placement_group import placement_group_table, remove_placement_group

logger = logging.getLogger(__name__)

SWEEP_INTERVAL_S = 5.0


class RecordPlacementGroup(WorkerGroupCallback):
    """Runs in the trial's Ray Train controller: records the workers' placement group with the search driver.

    When ASHA stops a trial, Tune ends the trial's actor and with it the controller, but the placement group
    outlives them (it belongs to the job): Ray Train's own cleaner needs the dashboard's state API, which a plain
    `ray.init()` may not start. The driver removes the recorded groups of every ended trial.
    """

    def __init__(self, ledger_name: str, trial_id: str):
        self.ledger_name, self.trial_id = ledger_name, trial_id

    def after_worker_group_start(self, worker_group) -> None:
        group = worker_group.get_worker_group_state().placement_group_handle.placement_group
        try:
            ray.get(ray.get_actor(self.ledger_name).add.remote(self.trial_id, group))
        except (ValueError, ray.exceptions.RayError) as error:  # never fail training over bookkeeping
            logger.warning("could not record the placement group of trial %s: %s", self.trial_id, error)


class FreeTrialPlacementGroups(tune.Callback):
    """Runs on the search driver: removes the placement groups of trials that ended (stopped, finished, failed)."""

    def __init__(self, ledger_name: str):
        self.ledger_name = ledger_name
        self._last_sweep = 0.0

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_trial_recover(self, iteration: int, trials: list, trial, **info) -> None:
        self._free([trial.trial_id])

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        # A stopped trial's controller can start a worker group after on_trial_complete: sweep the ended ones again.
        if time.monotonic() - self._last_sweep < SWEEP_INTERVAL_S:
            return
        self._last_sweep = time.monotonic()
        ended = [trial.trial_id for trial in trials if trial.status in ("TERMINATED", "ERROR")]
        if ended:
            self._free(ended)

    def _free(self, trial_ids: list[str]) -> None:
        try:
            ledger = ray.get_actor(self.ledger_name)
        except ValueError:  # no ledger (a search restored outside run_search): nothing was recorded
            return
        free_placement_groups(ledger, trial_ids)


class PlacementGroupLedger:
    """A small actor on the search driver's side: trial id -> placement groups its controllers created."""

    def __init__(self):
        self.groups: dict[str, list] = {}

    def add(self, trial_id: str, group) -> None:
        self.groups.setdefault(trial_id, []).append(group)

    def pop(self, trial_ids: list[str] | None) -> list:
        """The groups of these trials (all trials for None), forgotten here."""
        ids = list(self.groups) if trial_ids is None else [i for i in trial_ids if i in self.groups]
        return [group for trial_id in ids for group in self.groups.pop(trial_id)]


def ledger_name(path: str) -> str:
    return f"medray-placement-groups-{hashlib.sha1(path.encode()).hexdigest()[:12]}"


def start_ledger(path: str):
    actor = ray.remote(num_cpus=0)(PlacementGroupLedger)
    return actor.options(name=ledger_name(path), get_if_exists=True).remote()


def free_placement_groups(ledger, trial_ids: list[str] | None) -> None:
    for group in ray.get(ledger.pop.remote(trial_ids)):
        try:
            if placement_group_table(group).get("state") != "REMOVED":
                remove_placement_group(group)
        except Exception as error:  # already gone, or the cluster is shutting down
            logger.debug("placement group %s: %s", group.id, error)
