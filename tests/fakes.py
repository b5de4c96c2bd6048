"""Fakes that drive the real engine without HTTP (as httpx's MockTransport drives a client).

`FakeCanceller` answers from a script per asset id: each call pops the next answer (a reply,
a command, a list of commands, or an exception to raise); when a script is used up, a cancel
answers an empty success. It records every call in order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import anyio
import anyio.lowlevel

from worker.model import Attempt, CancelReply, Command, SearchPage, Target, TargetResult

Answer = CancelReply | Command | list[Command] | SearchPage | BaseException


def ok(*ids: str) -> CancelReply:
    """A code-0 cancel answer listing these command ids."""
    return CancelReply(200, 0, "OK", "req", tuple(Command(i, 1) for i in ids))


@dataclass
class FakeCanceller:
    """Scripted answers by asset id; `gate`, when set, holds every call until it is set."""

    script: dict[str, list[Answer]] = field(default_factory=dict)
    calls: list[tuple[str, str]] = field(default_factory=list)  # (action, asset id)
    gate: anyio.Event | None = None
    in_flight: int = 0
    most_in_flight: int = 0

    async def _answer(self, action: str, target: Target) -> Answer:
        asset = target.asset_id or ""
        self.calls.append((action, asset))
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            if self.gate is not None:
                await self.gate.wait()
            else:
                await anyio.lowlevel.checkpoint()
        finally:
            self.in_flight -= 1
        answers = self.script.get(asset)
        answer: Answer = answers.pop(0) if answers else ok()
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def cancel(self, target: Target) -> CancelReply:
        answer = await self._answer("cancel", target)
        assert isinstance(answer, CancelReply), answer
        return answer

    async def cancel_assets(self, targets: Sequence[Target]) -> CancelReply:
        """Scripted by the joined asset ids ("a1,a2"); recorded as one call."""
        joined = ",".join(t.asset_id or "" for t in targets)
        answer = await self._answer("cancel", Target(targets[0].org_id, asset_id=joined))
        assert isinstance(answer, CancelReply), answer
        return answer

    async def get_command(self, target: Target, command_id: str) -> Command:
        answer = await self._answer("get", target)
        assert isinstance(answer, Command), answer
        return answer

    async def search_page(self, target: Target, expression: str | None, page: int) -> SearchPage:
        """A scripted list of commands is one page holding all of them."""
        answer = await self._answer("search", target)
        if isinstance(answer, SearchPage):
            return answer
        assert isinstance(answer, list), answer
        return SearchPage(tuple(answer), len(answer), 0, 50)


@dataclass
class MemoryRecorder:
    """Attempts and results in memory, in the order the engine recorded them."""

    attempts: list[tuple[str, Attempt]] = field(default_factory=list)
    results: list[TargetResult] = field(default_factory=list)

    def attempt(self, attempt: Attempt, action: str) -> None:
        self.attempts.append((action, attempt))

    def result(self, result: TargetResult) -> None:
        self.results.append(result)

    def by_asset(self) -> dict[str, TargetResult]:
        """The results keyed by asset id (each must be there once)."""
        keyed = {r.target.asset_id or "": r for r in self.results}
        assert len(keyed) == len(self.results), "a target has two results"
        return keyed


@dataclass
class MarkRecorder:
    """An Admissions that remembers each ordinal, and what had been called by then."""

    calls: list[tuple[str, str]]
    admitted: list[tuple[int, int]] = field(default_factory=list)  # (ordinal, calls so far)

    def admit(self, ordinal: int) -> None:
        self.admitted.append((ordinal, len(self.calls)))


def assets(count: int, org: str = "o1") -> Iterable[tuple[int, Target]]:
    """(ordinal, target) for assets a0..a{count-1}."""
    return ((i, Target(org_id=org, asset_id=f"a{i}")) for i in range(count))
