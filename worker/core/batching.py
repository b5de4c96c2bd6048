"""Many assets per call (``assetId=a1,a2,...``), opt-in, and distrusted until shown to work.

The Cancel Command page says assetId "supports querying multiple assets, separated by commas";
the sentence is boilerplate on other pages and no official sample uses it (enos-api.md §1.1).
So lists are used only when the job asks (``limits.assets_per_call``), and the run watches
what the gateway does with them. Like :mod:`worker.core.decide`, this module is pure: events in,
actions out, no I/O, no loop.

- :class:`BatchCore` is one call for several targets: by asset id, no command id, one org.
  Each returned command's ``assetId`` attributes it to its target; a target with none is
  ``nothing_to_cancel``. A command naming no asset of the call cannot be attributed: every
  target of the call is then ``effect_unknown``.
- A list refused as a whole (99404 some asset unknown, 99400 list refused or too long) is
  **bisected**: halves, recursively, down to single calls, which give each target its own
  answer; one bad id costs about 2·log2(N) calls. Retryable errors retry the list whole.
- :class:`BatchPlan` is the run's trust in lists. It starts in **trial**: at most
  `trial_batches` lists are out at once and every other target goes one per call. After a
  trial list's answer, and the settle delay, each of its assets is searched (``state = 1``;
  no new target is admitted meanwhile, so the searches have the rate to themselves):
  a command created before the call and still pending means the gateway ignored part of the
  list; the run then goes one asset per call, and those assets are cancelled again alone.
  Lists are trusted once `trial_batches` lists passed with evidence (commands attributed to
  at least two of their assets: a gateway that reads the list as one unknown id and answers
  "nothing" shows no evidence).
- **Fallback**: a split whose lists all failed while each asset alone was accepted shows that
  lists are refused: the rest of the run goes one asset per call. A split in which lists of
  some size succeeded while longer ones were refused with 99400 lowers the list size.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

from worker.core.actions import (
    Action,
    Finish,
    Kind,
    Leave,
    Send,
    Situation,
    Wait,
    after_failure,
)
from worker.core.decide import TargetCore
from worker.core.retry import Retrying, RetryPolicy
from worker.enos import protocol as p
from worker.errors import EnOSError, TargetError
from worker.model import CancelReply, Command, SearchPage, Target, TargetResult

LIST_CANCEL = Send(Kind.BATCH)
_REFUSED_LIST_CODES = (p.CODE_NOT_FOUND, p.CODE_INVALID_PARAM)


def groupable(target: Target) -> bool:
    """Whether a target may share a call: by asset id, every cached command, no match."""
    return target.asset_id is not None and target.command_id is None and target.match is None


Item = tuple[int, Target]  # (ordinal, target): a target and its place in the job's list


def take_list(first: Item, rest: Iterator[Item], size: int) -> tuple[list[Item], Item | None]:
    """`first` and the next targets of `rest` that may share its call: in order, one org, up
    to `size`; the first one that may not is returned apart, to be taken next."""
    items = [first]
    org = first[1].org_id
    while len(items) < size:
        item = next(rest, None)
        if item is None:
            break
        if not groupable(item[1]) or item[1].org_id != org:
            return items, item
        items.append(item)
    return items, None


def planned_calls(targets: Iterable[Target], size: int) -> int:
    """The cancel calls a run makes when every list is accepted: the engine's grouping
    (:func:`take_list` over the targets, lists for groupable ones), without the trial's
    searches or any bisection."""
    calls = 0
    rest: Iterator[Item] = enumerate(targets)
    item = next(rest, None)
    while item is not None:
        calls += 1
        if not groupable(item[1]):
            item = next(rest, None)
            continue
        _, item = take_list(item, rest, size)
        item = item if item is not None else next(rest, None)
    return calls


class Trust(StrEnum):
    """How far the run trusts lists."""

    TRIAL = "trial"  # a few lists at a time, each verified by searching its assets
    TRUSTED = "trusted"  # lists are sent as asked, unverified
    SINGLE = "single"  # one asset per call for the rest of the run


@dataclass(frozen=True, slots=True)
class Fanout:
    """A list call ended (for now): record these results, and schedule these calls next
    (the halves of a split, or assets to cancel again alone)."""

    results: tuple[TargetResult, ...]
    parts: tuple[BatchCore, ...] = ()


@dataclass
class BatchPlan:
    """The run's lists: their size, how far they are trusted, and why that changed.

    `on_change(event, why)` is told of every change (the engine logs it).
    """

    size: int
    trial_batches: int = 3
    settle_s: float = 2.0  # EnOS settles a cancel within about 2 s; searched after that
    trust: Trust = Trust.TRIAL
    trials_open: int = 0
    searching: int = 0  # trial lists whose assets are being searched: new targets wait
    passed: int = 0
    lists: int = 0  # list calls answered code 0
    notes: list[str] = field(default_factory=list)
    on_change: Callable[[str, str], None] | None = None

    def per_call(self) -> int:
        """How many assets the next call may name."""
        if self.trust is Trust.SINGLE:
            return 1
        if self.trust is Trust.TRUSTED or self.trials_open < self.trial_batches:
            return self.size
        return 1  # the trial lists are out: the rest goes alone until they are verified

    def group(self, members: list[TargetCore], policy: RetryPolicy) -> BatchCore:
        """A list call for `members` (a trial while lists are not trusted yet)."""
        trial = self.trust is Trust.TRIAL
        self.trials_open += trial
        return BatchCore(members, self, policy, _Split(trial=trial))

    def fall_back(self, why: str) -> None:
        """One asset per call for the rest of the run."""
        if self.trust is not Trust.SINGLE:
            self.trust = Trust.SINGLE
            self._changed("batching_off", f"{why}; the rest of the run goes one asset per call")

    def _changed(self, event: str, why: str) -> None:
        self.notes.append(why)
        if self.on_change is not None:
            self.on_change(event, why)

    def _verified(self, *, evidence: bool, stale: int) -> None:
        if stale:
            self.fall_back(
                f"after a list call, {stale} of its assets still had a command created before "
                "the call pending: the gateway ignored part of the list"
            )
        elif evidence and self.trust is Trust.TRIAL:
            self.passed += 1
            if self.passed >= self.trial_batches:
                self.trust = Trust.TRUSTED
                self._changed(
                    "batching_trusted",
                    f"{self.passed} list calls verified by searching each of their assets; "
                    f"lists of up to {self.size} assets are trusted",
                )

    def _split_done(self, split: _Split) -> None:
        """Every call of one list's split has ended: what did it show about lists?"""
        if split.trial:
            self.trials_open -= 1
        if split.refused and not split.lists_ok and not split.singles_failed and split.singles_ok:
            self.fall_back(
                f"lists were refused ({split.refused} calls) while each asset alone was accepted"
            )
        elif split.too_long and 2 <= split.largest_ok < min(split.too_long, self.size):
            self.size = split.largest_ok
            self._changed(
                "batch_size_lowered",
                f"lists of {split.too_long} assets were refused (99400), lists of "
                f"{split.largest_ok} accepted; lists are now {self.size} assets at most",
            )


@dataclass(slots=True)
class _Split:
    """One admitted list and every call bisection made of it, until all have ended."""

    trial: bool
    open: int = 1
    refused: int = 0  # list calls refused as a whole (99404 / 99400)
    too_long: int = 0  # the shortest list refused with 99400 (0: none)
    lists_ok: int = 0
    largest_ok: int = 0
    singles_ok: int = 0
    singles_failed: int = 0  # single calls refused: the bad id, not the list


@dataclass(slots=True)
class _Verification:
    """Searching a trial list's assets, one after the other."""

    replies: list[CancelReply]
    sent_ms: int  # when the answered call was sent: older pending commands were ignored
    index: int = 0
    page: int = 1
    stale: list[int] = field(default_factory=list)
    unverified: list[int] = field(default_factory=list)
    retry: Retrying | None = None
    searching: bool = False


class BatchCore:
    """One call for several targets' assets (``assetId=a1,a2,...``), from its first send to
    its members' results (or to their being left resumable).

    It answers the engine's events like :class:`worker.core.decide.TargetCore`; a member's result
    is made by the member's own core from the part of the answer that is its own.
    """

    __slots__ = (
        "_answered_at",
        "_calls",
        "_evidence",
        "_policy",
        "_retry",
        "_split",
        "_verify",
        "members",
        "plan",
    )

    def __init__(
        self, members: list[TargetCore], plan: BatchPlan, policy: RetryPolicy, split: _Split
    ) -> None:
        self.members = members
        self.plan = plan
        self._policy = policy
        self._split = split
        self._calls = 0
        self._retry: Retrying | None = None
        self._verify: _Verification | None = None
        self._evidence = False
        self._answered_at = 0.0

    @property
    def target(self) -> Target:
        """The target the current call is about (the one searched, while verifying)."""
        verify = self._verify
        return self.members[verify.index if verify is not None else 0].target

    @property
    def batch(self) -> tuple[Target, ...]:
        """Every target the current call names (empty for a single asset or a search)."""
        if self._verify is not None or len(self.members) == 1:
            return ()
        return tuple(member.target for member in self.members)

    @property
    def sent(self) -> int:
        """The number of the current call: of this list, or of the searched target's calls."""
        verify = self._verify
        return self.members[verify.index].sent if verify is not None else self._calls

    def start(self) -> Send:
        """The first call."""
        return self._send()

    def _send(self) -> Send:
        verify = self._verify
        if verify is not None:
            if not verify.searching:
                verify.searching = True
                self.plan.searching += 1
            self.members[verify.index].count_call()
            return Send(Kind.SEARCH, page=verify.page)
        self._calls += 1
        for member in self.members:
            member.count_call()
        return LIST_CANCEL

    def waited(self, situation: Situation) -> Action | Fanout:
        """The wait (a retry's, the settle delay, a split's start) is over."""
        if situation.stopping:
            return self.stopped()
        return self._send()

    def stopped(self) -> Leave | Fanout:
        """The run stopped: a list already answered keeps its results (unverified);
        otherwise the members are left resumable."""
        verify = self._verify
        if verify is None:
            return Leave("the run is stopping")
        self._end_search(verify)
        self._done()
        return Fanout(self._results(verify.replies, skip=()))

    # -- answers ----------------------------------------------------------------------------

    def cancelled(
        self, reply: CancelReply, now: float, latency_ms: float | None
    ) -> Action | Fanout:
        """A code-0 answer to the list: each member's part of it."""
        for member in self.members:
            member.note_latency(latency_ms)
        replies = self._attribute(reply)
        self._answered_at = now
        split, size = self._split, len(self.members)
        if size == 1:
            split.singles_ok += 1
        else:
            split.lists_ok += 1
            split.largest_ok = max(split.largest_ok, size)
            self.plan.lists += 1
        if split.trial and size > 1:
            sent_ms = int((now - (latency_ms or 0.0) / 1000) * 1000)
            self._verify = _Verification(replies, sent_ms)
            return Wait(self.plan.settle_s)
        self._done()
        return Fanout(self._results(replies, skip=()))

    def _attribute(self, reply: CancelReply) -> list[CancelReply]:
        """Each member's part of the answer, by the returned commands' ``assetId``."""
        if len(self.members) == 1:
            return [reply]
        owner = {member.target.asset_id: index for index, member in enumerate(self.members)}
        commands: list[list[Command]] = [[] for _ in self.members]
        stray = reply.unreadable
        for command in reply.commands:
            index = owner.get(command.asset_id)
            if index is None:
                stray += 1
            else:
                commands[index].append(command)
        self._evidence = sum(1 for found in commands if found) >= 2
        problem = reply.problem
        if stray and problem is None:
            problem = f"{stray} cancelled commands could not be attributed to an asset of the call"
        return [
            CancelReply(
                reply.http_status,
                reply.code,
                reply.msg,
                reply.request_id,
                tuple(found),
                unreadable=stray,
                problem=problem,
            )
            for found in commands
        ]

    def searched(self, page: SearchPage, now: float, latency_ms: float | None) -> Action | Fanout:
        """A page of one member's pending commands, after the list's answer."""
        verify = self._verify
        assert verify is not None
        self.members[verify.index].note_latency(latency_ms)
        older = any(
            command.create_time_ms is None or command.create_time_ms < verify.sent_ms
            for command in page.commands
            if command.state in (None, p.CommandState.CREATED)
        )
        if older or page.unreadable:
            verify.stale.append(verify.index)
        elif page.more(verify.page):
            verify.page += 1
            return self._send()
        return self._next_member(now)

    def _next_member(self, now: float) -> Action | Fanout:
        verify = self._verify
        assert verify is not None
        verify.index += 1
        verify.page, verify.retry = 1, None
        if verify.index < len(self.members):
            return self._send()
        return self._verified(now)

    def _verified(self, now: float) -> Fanout:
        """Every member searched: results for the clean ones, the others cancelled alone."""
        verify = self._verify
        assert verify is not None
        self.plan._verified(evidence=self._evidence, stale=len(verify.stale))
        again = sorted(verify.stale + verify.unverified)
        parts = []
        for index in again:
            member = self.members[index]
            member.listed_earlier(verify.replies[index])
            parts.append(BatchCore([member], self.plan, self._policy, self._split))
        self._split.open += len(parts)
        self._end_search(verify)
        self._verify = None
        self._done()
        return Fanout(self._results(verify.replies, skip=again), tuple(parts))

    def failed(
        self,
        error: EnOSError,
        now: float,
        latency_ms: float | None,
        rng: random.Random,
        situation: Situation,
    ) -> Action | Fanout:
        """A classified failure of the current call."""
        if self._verify is not None:
            return self._search_failed(error, now, rng, situation)
        size = len(self.members)
        for member in self.members:
            member.note_latency(latency_ms)
            member.may_have_applied(error.maybe_applied)
        if size > 1 and isinstance(error, TargetError) and error.code in _REFUSED_LIST_CODES:
            return self._bisect(error)
        if self._retry is None:
            self._retry = Retrying(self._policy)
        decision = self._retry.failed(error, rng)
        return after_failure(
            decision, error, situation, give_up=lambda: self._failed_for_good(error, now)
        )

    def _failed_for_good(self, error: EnOSError, now: float) -> Fanout:
        if len(self.members) == 1 and isinstance(error, TargetError):
            self._split.singles_failed += 1
        self._done()
        return Fanout(tuple(self._sized(m.give_up(error, now)) for m in self.members))

    def _bisect(self, error: TargetError) -> Fanout:
        split = self._split
        split.refused += 1
        if error.code == p.CODE_INVALID_PARAM:
            size = len(self.members)
            split.too_long = min(split.too_long or size, size)
        half = (len(self.members) + 1) // 2
        split.open += 1  # two calls instead of this one
        return Fanout(
            (),
            (
                BatchCore(self.members[:half], self.plan, self._policy, split),
                BatchCore(self.members[half:], self.plan, self._policy, split),
            ),
        )

    def _search_failed(
        self, error: EnOSError, now: float, rng: random.Random, situation: Situation
    ) -> Action | Fanout:
        """A verifying search failed: retried as any call; if it cannot be had, the asset is
        cancelled again alone (harmless: its cached commands are what the job asked for)."""
        verify = self._verify
        assert verify is not None
        if verify.retry is None:
            verify.retry = Retrying(self._policy)
        decision = verify.retry.failed(error, rng)

        def unverified() -> Action | Fanout:
            verify.unverified.append(verify.index)
            return self._next_member(now)

        return after_failure(
            decision, error, situation, give_up=unverified, leave=self.stopped, fatal_stops=False
        )

    # -- results ----------------------------------------------------------------------------

    def _results(
        self, replies: list[CancelReply], *, skip: list[int] | tuple[()]
    ) -> tuple[TargetResult, ...]:
        """The members' results from their parts of the answer, as of when it came."""
        results = []
        for index, (member, reply) in enumerate(zip(self.members, replies, strict=True)):
            if index in skip:
                continue
            action = member.cancelled(reply, self._answered_at, member.last_latency_ms)
            assert isinstance(action, Finish)  # an asset's cancel-all ends with its answer
            results.append(self._sized(action.result))
        return tuple(results)

    def _end_search(self, verify: _Verification) -> None:
        if verify.searching:
            verify.searching = False
            self.plan.searching -= 1

    def _sized(self, result: TargetResult) -> TargetResult:
        return result._replace(batch_size=len(self.members))

    def _done(self) -> None:
        split = self._split
        split.open -= 1
        if split.open == 0:
            self.plan._split_done(split)
