"""Admission: the shared iterator of targets turned into cores, in order. A target that may
share a list call is grouped with the next ones (``worker.core.batching``); every target is
told to the admission mark before its first call (crash truth: a mark that cannot be written
stops the run, and the target is not sent)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from worker.core.batching import BatchCore, BatchPlan, groupable, take_list
from worker.core.decide import TargetCore
from worker.core.ports import Admissions, EngineSettings, StopReason
from worker.errors import StoreError
from worker.model import Target

Item = tuple[int, Target]  # (ordinal, target): its place in the job's list, the same each segment


class Admission:
    """Where the engine's workers take new work from."""

    def __init__(
        self,
        settings: EngineSettings,
        batching: BatchPlan | None,
        *,
        admissions: Admissions | None,
        sent_before: Callable[[int, Target], bool] | None,
        clock: Callable[[], float],
        stop: Callable[[StopReason, str], None],
    ) -> None:
        self._settings = settings
        self._batching = batching
        self._admissions = admissions
        self._sent_before = sent_before
        self._clock = clock
        self._stop = stop
        self._targets: Iterator[Item] = iter(())
        self._held: Item | None = None  # read ahead while grouping a list
        self.open = True  # False once the targets are exhausted

    def start(self, targets: Iterator[Item]) -> None:
        """The targets of this run, in order."""
        self._targets, self.open = targets, True

    def next(self) -> TargetCore | BatchCore | None:
        """The next target (or list of targets), told to the admission mark first; None when
        there is none (see `open`) or it may not be sent."""
        item, self._held = self._held or next(self._targets, None), None
        if item is None:
            self.open = False
            return None
        plan = self._batching
        if plan is not None and groupable(item[1]) and (size := plan.per_call()) > 1:
            return self._list(item, size, plan)
        ordinal, target = item
        return self._core(ordinal, target) if self._admitted(ordinal) else None

    def _admitted(self, ordinal: int) -> bool:
        if self._admissions is not None:
            try:
                self._admissions.admit(ordinal)
            except StoreError as error:
                self._stop(StopReason.FATAL, str(error))
                return False
        return True

    def _list(self, first: Item, size: int, plan: BatchPlan) -> BatchCore | None:
        """`first` and the next targets that may share its call (one held back for later)."""
        items, self._held = take_list(first, self._targets, size)
        if not self._admitted(items[-1][0]):
            return None
        members = [self._core(ordinal, target) for ordinal, target in items]
        return plan.group(members, self._settings.policy)

    def _core(self, ordinal: int, target: Target) -> TargetCore:
        settings, sent_before = self._settings, self._sent_before
        return TargetCore(
            target,
            settings.policy,
            started=self._clock(),
            probe=settings.dry_run,
            sent_before=sent_before is not None and sent_before(ordinal, target),
            verify=settings.verify,
        )
