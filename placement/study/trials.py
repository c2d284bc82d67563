"""The trial store and queue of `recommend`: Optuna's storage, not its sampler or pruner.

One study per run. Each trial is enqueued with its key (stage, selector, budget, seed, steps, rate) as user
attributes; any number of workers pop waiting trials (Optuna's own WAITING -> RUNNING transition, which only one
worker wins), run them and store the validation loss. The schedule is fixed, so the next stage's keys follow from
the finished trials alone: every worker computes the same ones, enqueues those not yet present, and a key enqueued
twice by two workers at once runs once (the lowest trial number of a key is the one that runs).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Iterable

from ..errors import PlacementError

STUDY = "recommend"
JOURNAL = "trials.journal"
KEY_FIELDS = ("stage", "selector", "budget", "seed", "steps", "lr")


def key_text(key: dict) -> str:
    return json.dumps({k: key[k] for k in KEY_FIELDS}, sort_keys=True)


def default_storage(folder: str | Path) -> str:
    return str(Path(folder) / JOURNAL)


def _storage(url: str):
    """A storage for `url`: a database URL (sqlite:///, postgresql://, ...) or a journal file path, the default,
    which several local processes can share through file locks."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(logging.WARNING)
    if "://" in url:
        return optuna.storages.RDBStorage(url)
    return JournalStorage(JournalFileBackend(url))


class TrialQueue:
    """One run's study: enqueue keys, pop one to run, record its result, read what has finished."""

    def __init__(self, url: str, create: bool = False):
        import optuna

        self.url = url
        if not create and "://" not in url and not Path(url).is_file():
            raise PlacementError(f"no trial study at {url}: start the run with placement recommend first")
        self.storage = _storage(url)
        try:
            self.study = optuna.create_study(storage=self.storage, study_name=STUDY, load_if_exists=create)
        except optuna.exceptions.DuplicatedStudyError:  # joining: the study exists, as it should
            self.study = optuna.load_study(storage=self.storage, study_name=STUDY)
        self.study_id = self.storage.get_study_id_from_name(STUDY)

    def trials(self, states=None) -> list:
        return self.storage.get_all_trials(self.study_id, deepcopy=False, states=states)

    def keys(self) -> dict[str, int]:
        """Each enqueued key and the lowest trial number that carries it (the one that runs); a failed trial (a
        worker that died, reset on resume) no longer holds its key."""
        from optuna.trial import TrialState

        out: dict[str, int] = {}
        for trial in self.trials():
            text = trial.user_attrs.get("key")
            if trial.state == TrialState.FAIL:
                continue
            if text is not None and (text not in out or trial.number < out[text]):
                out[text] = trial.number
        return out

    def enqueue(self, keys: Iterable[dict]) -> int:
        present = self.keys()
        added = 0
        for key in keys:
            text = key_text(key)
            if text not in present:
                self.study.enqueue_trial({}, user_attrs={"key": text, **{k: key[k] for k in KEY_FIELDS}})
                present[text] = -1
                added += 1
        return added

    def pop(self):
        """A waiting trial this worker now owns (RUNNING), or None. A duplicate of a key is closed, not run."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        for trial in self.trials(states=(TrialState.WAITING,)):
            try:
                won = self.storage.set_trial_state_values(trial._trial_id, TrialState.RUNNING)
            except UpdateFinishedTrialError:  # run and finished meanwhile by another worker
                continue
            if not won:
                continue
            if self.keys().get(trial.user_attrs["key"]) != trial.number:
                self.storage.set_trial_user_attr(trial._trial_id, "duplicate", True)
                self.storage.set_trial_state_values(trial._trial_id, TrialState.PRUNED)
                continue
            return trial
        return None

    def reset_running(self) -> int:
        """Fail the trials left running by a worker that stopped, so that their keys run again (on resume)."""
        from optuna.trial import TrialState

        stale = self.trials(states=(TrialState.RUNNING,))
        for trial in stale:
            self.storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        return len(stale)

    def finish(self, trial, value: float, result: dict) -> None:
        from optuna.trial import TrialState

        for name, item in result.items():
            self.storage.set_trial_user_attr(trial._trial_id, name, item)
        self.storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, values=[value])

    def results(self) -> dict[str, dict]:
        """Finished trials by key: their key fields and result attributes."""
        from optuna.trial import TrialState

        return {t.user_attrs["key"]: dict(t.user_attrs) | {"value": t.value}
                for t in self.trials(states=(TrialState.COMPLETE,)) if "key" in t.user_attrs}


def work(queue: TrialQueue, next_keys: Callable[[dict], list[dict] | None], run: Callable[[dict], dict],
         on_done: Callable[[dict], None] | None = None, poll: float = 0.5) -> dict[str, dict]:
    """Run trials until the schedule is done. `next_keys(results)` gives the keys the schedule needs now, given the
    finished results (None: done); `run(key) -> result dict` with a `val_loss`. Returns every finished result."""
    while True:
        results = queue.results()
        needed = next_keys(results)
        if needed is None:
            return results
        queue.enqueue(needed)
        trial = queue.pop()
        if trial is None:
            if all(key_text(k) in results for k in needed):
                continue  # the stage just finished: on to the next one
            time.sleep(poll)  # the stage's last trials run elsewhere
            continue
        key = {k: trial.user_attrs[k] for k in KEY_FIELDS}
        result = run(key)
        value = float(result["val_loss"])
        queue.finish(trial, value if value == value else float("inf"), result)  # a NaN loss ranks last
        if on_done is not None:
            on_done(key)
