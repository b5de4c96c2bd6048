"""Many assets per call, as pure decisions: attribution, bisection, fallback, self-verification.

The cores are driven here by a small synchronous loop standing in for the engine (no event
loop, no HTTP): each call is answered by a function of the assets it names.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from worker.core.actions import Kind, Leave, Send, Situation, Wait
from worker.core.batching import (
    LIST_CANCEL,
    BatchCore,
    BatchPlan,
    Fanout,
    Trust,
    groupable,
    planned_calls,
)
from worker.core.decide import TargetCore
from worker.core.retry import RetryPolicy
from worker.errors import EnOSError, RetryableError, TargetError
from worker.model import CancelReply, Command, Match, Outcome, SearchPage, Target, TargetResult

POLICY = RetryPolicy(attempts=3, base_s=0.0, cap_s=0.0)
RUNNING = Situation()
NOW = 1_000.0
Answer = CancelReply | SearchPage | EnOSError


def reply(*pairs: tuple[str, str], unreadable: int = 0) -> CancelReply:
    """A code-0 cancel answer listing (asset id, command id) pairs."""
    commands = tuple(Command(command, 1, asset_id=asset) for asset, command in pairs)
    return CancelReply(200, 0, "OK", "req-1", commands, unreadable=unreadable)


def members(*assets: str) -> list[TargetCore]:
    return [TargetCore(Target("o1", asset_id=a), POLICY, started=NOW) for a in assets]


def unknown(code: int = 99404) -> TargetError:
    return TargetError("The specified device does not exist", code=code, http_status=200)


class Gateway:
    """Answers each call from the assets it names; counts the calls by kind."""

    def __init__(
        self,
        cancel: Callable[[list[str]], Answer],
        search: Callable[[str], Answer] | None = None,
    ) -> None:
        self.cancel = cancel
        self.search = search or (lambda asset: SearchPage((), 0, 0, 50))
        self.calls: list[tuple[str, int]] = []  # (kind, assets named)

    def run(self, first: BatchCore) -> list[TargetResult]:
        """Drive `first` and every call it fans out to, until all have ended."""
        results: list[TargetResult] = []
        queue: list[tuple[BatchCore, object]] = [(first, first.start())]
        while queue:
            core, action = queue.pop(0)
            while isinstance(action, Send | Wait):
                if isinstance(action, Wait):
                    action = core.waited(RUNNING)
                    continue
                action = self._answer(core, action)
            if isinstance(action, Fanout):
                results += action.results
                queue += [(part, part.start()) for part in action.parts]
            else:
                assert isinstance(action, Leave), action
        return results

    def _answer(self, core: BatchCore, send: Send) -> object:
        rng = random.Random(1)
        if send.kind is Kind.SEARCH:
            self.calls.append(("search", 1))
            answer = self.search(core.target.asset_id or "")
        else:
            assert send is LIST_CANCEL
            assets = [m.target.asset_id or "" for m in core.members]
            self.calls.append(("cancel", len(assets)))
            answer = self.cancel(assets)
        if isinstance(answer, EnOSError):
            return core.failed(answer, NOW, 5.0, rng, RUNNING)
        if isinstance(answer, SearchPage):
            return core.searched(answer, NOW, 5.0)
        return core.cancelled(answer, NOW, 5.0)


def each_has_one(assets: list[str]) -> CancelReply:
    """Every named asset had one cached command, c-<asset>."""
    return reply(*((a, f"c-{a}") for a in assets))


def trusted(size: int) -> BatchPlan:
    return BatchPlan(size, trust=Trust.TRUSTED, settle_s=0.0)


def by_asset(results: list[TargetResult]) -> dict[str, TargetResult]:
    keyed = {r.target.asset_id or "": r for r in results}
    assert len(keyed) == len(results), "a target has two results"
    return keyed


def test_each_returned_command_goes_to_its_asset() -> None:
    plan = trusted(3)
    results = by_asset(
        Gateway(lambda _: reply(("a1", "c1"), ("a3", "c3"), ("a3", "c4"))).run(
            plan.group(members("a1", "a2", "a3"), POLICY)
        )
    )
    assert results["a1"].cancelled_command_ids == ("c1",)
    assert results["a2"].outcome is Outcome.NOTHING_TO_CANCEL
    assert results["a3"].cancelled_command_ids == ("c3", "c4")
    assert {r.batch_size for r in results.values()} == {3}
    assert {r.request_id for r in results.values()} == {"req-1"}
    assert not any(r.effect_unknown for r in results.values())
    assert plan.lists == 1


def test_a_command_of_no_listed_asset_makes_every_target_unknown() -> None:
    """It was cancelled, but for which target the answer does not say: no claim is lost or
    invented, and nobody's 'nothing' is trusted."""
    results = Gateway(lambda _: reply(("a1", "c1"), ("zz", "c9"))).run(
        trusted(2).group(members("a1", "a2"), POLICY)
    )
    assert all(r.effect_unknown for r in results)
    assert "could not be attributed" in (results[0].error or "")
    assert by_asset(results)["a1"].cancelled_command_ids == ("c1",)


def test_one_unknown_id_costs_about_two_log2_n_extra_calls() -> None:
    assets = [f"a{i}" for i in range(25)]

    def strict(named: list[str]) -> Answer:
        return unknown() if "a17" in named else each_has_one(named)

    plan = trusted(25)
    gateway = Gateway(strict)
    results = by_asset(gateway.run(plan.group(members(*assets), POLICY)))
    assert (results["a17"].outcome, results["a17"].code) == (Outcome.FAILED, 99404)
    assert all(results[a].cancelled_command_ids == (f"c-{a}",) for a in assets if a != "a17")
    extra = len(gateway.calls) - 1
    assert extra <= 2 * 5  # 2 * ceil(log2 25)
    assert (plan.trust, plan.size) == (Trust.TRUSTED, 25)  # a bad id says nothing of lists


def test_lists_refused_fall_back_to_one_asset_per_call() -> None:
    """A gateway without lists reads 'a1,a2' as one unknown id: every list fails, every
    asset alone works; the run goes one per call, and every target has its own answer."""

    def off(named: list[str]) -> Answer:
        return unknown() if len(named) > 1 else each_has_one(named)

    plan = BatchPlan(8, trust=Trust.TRUSTED)
    results = by_asset(Gateway(off).run(plan.group(members(*(f"a{i}" for i in range(8))), POLICY)))
    assert all(r.outcome is Outcome.CANCELLED for r in results.values())
    assert (plan.trust, plan.per_call()) == (Trust.SINGLE, 1)
    assert "refused" in plan.notes[0]


def test_lists_longer_than_the_gateway_takes_lower_the_size() -> None:
    def at_most_6(named: list[str]) -> Answer:
        return unknown(99400) if len(named) > 6 else each_has_one(named)

    plan = trusted(25)
    results = Gateway(at_most_6).run(plan.group(members(*(f"a{i}" for i in range(25))), POLICY))
    assert [r.outcome for r in results] == [Outcome.CANCELLED] * 25
    assert plan.trust is Trust.TRUSTED
    assert 2 <= plan.size <= 6


def test_a_lost_answer_retries_the_list_whole_then_nothing_is_unknown() -> None:
    answers: list[Answer] = [RetryableError("no answer within 10 s", maybe_applied=True), reply()]
    gateway = Gateway(lambda _: answers.pop(0))
    results = gateway.run(trusted(3).group(members("a1", "a2", "a3"), POLICY))
    assert gateway.calls == [("cancel", 3), ("cancel", 3)]
    assert {(r.outcome, r.effect_unknown, r.attempts) for r in results} == {
        (Outcome.NOTHING_TO_CANCEL, True, 2)
    }


def test_a_list_that_keeps_failing_fails_each_target() -> None:
    gateway = Gateway(lambda _: RetryableError("gateway error HTTP 503", maybe_applied=True))
    results = gateway.run(trusted(2).group(members("a1", "a2"), POLICY))
    assert len(gateway.calls) == POLICY.attempts
    assert {(r.outcome, r.effect_unknown) for r in results} == {(Outcome.FAILED, True)}


def test_a_trial_list_is_verified_and_trusted_after_three() -> None:
    plan = BatchPlan(4, trial_batches=3, settle_s=0.0)
    pending: dict[str, list[Command]] = {}
    gateway = Gateway(each_has_one, lambda a: SearchPage(tuple(pending.get(a, ())), 0, 0, 50))
    for batch in range(3):
        assert plan.per_call() == 4
        group = plan.group(members(*(f"b{batch}-{i}" for i in range(4))), POLICY)
        if batch < 2:
            assert plan.trust is Trust.TRIAL
        results = gateway.run(group)
        assert all(r.outcome is Outcome.CANCELLED for r in results)
    assert plan.trust is Trust.TRUSTED
    assert [kind for kind, _ in gateway.calls].count("search") == 12


def test_trial_lists_out_at_once_are_capped_and_the_rest_goes_alone() -> None:
    plan = BatchPlan(4, trial_batches=2)
    plan.group(members("a", "b"), POLICY)
    plan.group(members("c", "d"), POLICY)
    assert plan.per_call() == 1


def test_a_gateway_that_ignores_part_of_a_list_is_caught() -> None:
    """Only the first asset is acted on; the others' older commands are still pending: the
    run falls back, and those assets are cancelled again, alone."""
    cached = {
        a: [Command(f"c-{a}", 1, create_time_ms=int(NOW * 1000) - 60_000)]
        for a in ("a1", "a2", "a3")
    }

    def first_only(named: list[str]) -> Answer:
        done = reply(*((named[0], c.command_id) for c in cached[named[0]]))
        cached[named[0]] = []
        return done

    def search(asset: str) -> SearchPage:
        return SearchPage(tuple(cached[asset]), len(cached[asset]), 0, 50)

    plan = BatchPlan(3, settle_s=0.0)
    gateway = Gateway(first_only, search)
    results = by_asset(gateway.run(plan.group(members("a1", "a2", "a3"), POLICY)))
    assert plan.trust is Trust.SINGLE
    assert "ignored part of the list" in plan.notes[0]
    assert all(results[a].cancelled_command_ids == (f"c-{a}",) for a in cached)
    assert (results["a1"].batch_size, results["a2"].batch_size) == (3, 1)
    assert gateway.calls == [
        ("cancel", 3),
        ("search", 1),
        ("search", 1),
        ("search", 1),
        ("cancel", 1),
        ("cancel", 1),
    ]


def test_a_list_without_evidence_does_not_earn_trust() -> None:
    """Nothing cancelled anywhere shows nothing about lists: the trial goes on."""
    plan = BatchPlan(2, trial_batches=1, settle_s=0.0)
    Gateway(lambda _: reply()).run(plan.group(members("a1", "a2"), POLICY))
    assert (plan.trust, plan.trials_open) == (Trust.TRIAL, 0)


def test_a_stop_while_verifying_keeps_the_answer() -> None:
    plan = BatchPlan(2, settle_s=5.0)
    core = plan.group(members("a1", "a2"), POLICY)
    assert core.start() is LIST_CANCEL
    wait = core.cancelled(each_has_one(["a1", "a2"]), NOW, 5.0)
    assert wait == Wait(5.0)
    stopped = core.stopped()
    assert isinstance(stopped, Fanout)
    assert {r.cancelled_command_ids for r in stopped.results} == {("c-a1",), ("c-a2",)}


def test_a_stop_before_an_answer_leaves_every_target_resumable() -> None:
    core = trusted(2).group(members("a1", "a2"), POLICY)
    core.start()
    error = RetryableError("gateway error HTTP 503", maybe_applied=True)
    wait = core.failed(error, NOW, 5.0, random.Random(1), RUNNING)
    assert isinstance(wait, Wait)
    assert isinstance(core.waited(Situation(stopping=True)), Leave)


def test_what_may_share_a_call_and_how_many_calls_a_run_plans() -> None:
    by_id, pair = Target("o1", asset_id="a"), Target("o1", product_key="p", device_key="d")
    assert groupable(by_id)
    assert not groupable(Target("o1", asset_id="a", command_id="1"))
    assert not groupable(Target("o1", asset_id="a", match=Match(command_type=1)))
    assert not groupable(pair)
    other_org = Target("o2", asset_id="b")
    run = [by_id] * 5 + [pair] + [by_id] * 2 + [other_org] * 3
    assert planned_calls(run, 2) == 3 + 1 + 1 + 2
    assert planned_calls(run, 1) == len(run)
