"""What to do next, in words an operator can paste: the one place a resume command is made, the
one-sentence verdict a report opens with, and the steps that follow from it."""

from __future__ import annotations

from dataclasses import dataclass

from worker.store.layout import RunDir
from worker.store.state import Manifest, Summary


def resume_command(job: str, run: RunDir, *, retry_failed: bool = False) -> str:
    """The command that continues the run in `run` (of the job file `job`)."""
    flag = " --retry-failed" if retry_failed else ""
    return f"worker run {job} --resume {run}{flag}"


def stop_words(summary: Summary) -> str:
    """Why the last segment stopped, short: "SIGTERM", "deadline reached", "aborted: ..."."""
    reason, message = summary.stopped or "", (summary.stop_message or "").strip()
    if reason == "interrupted":
        return message.removesuffix(" received") or "interrupted"
    if reason == "deadline":
        return "deadline reached"
    return f"{reason}: {message}" if message else reason


def state_of(summary: Summary, holder: str | None) -> str:
    """running, died, stopped (targets left), failed, unknown (effects to verify) or done."""
    if holder is not None:
        return "running"
    if not summary.finished:
        return "died"
    if summary.not_attempted:
        return "stopped"
    if summary.outcomes.get("failed"):
        return "failed"
    return "unknown" if summary.effect_unknown else "done"


def verdict(summary: Summary, holder: str | None) -> str:
    """The run in one sentence, the first thing its section says."""
    total, left = summary.targets, summary.not_attempted
    state = state_of(summary, holder)
    if state == "running":
        final = total - left
        return f"Running now ({holder}): {final:,} of {total:,} targets final so far."
    if state == "died":
        return (
            f"Did not finish (the process died): {left:,} of {total:,} targets not attempted; "
            "resumable."
        )
    if state == "stopped":
        return (
            f"Stopped early ({stop_words(summary)}): {left:,} of {total:,} targets not "
            "attempted; resumable."
        )
    done = summary.outcomes.get("cancelled", 0) + summary.outcomes.get("nothing_to_cancel", 0)
    opening = "Finished" if summary.stopped in (None, "finished") else "Ended"
    if opening == "Ended":
        opening = f"Ended ({stop_words(summary)})"
    sentence = f"{opening}: {done:,} of {total:,} targets cancelled or had nothing to cancel"
    failed = summary.outcomes.get("failed", 0)
    if failed:
        sentence += f"; {failed:,} failed (see below)"
    if summary.effect_unknown:
        sentence += f"; {summary.effect_unknown:,} with an effect unknown (see below)"
    return sentence + "."


@dataclass(frozen=True)
class Step:
    """One thing to do next: what and why in words, and the commands to paste (in order)."""

    text: str
    commands: tuple[str, ...] = ()


def next_steps(summary: Summary, manifest: Manifest, run: RunDir, holder: str | None) -> list[Step]:
    """What the run leaves to do, most urgent first: a running run only asks for patience;
    unfinished targets are resumed (the failed ones with them); effects unknown are searched
    for; failed targets of a complete run get the follow-up job."""
    if holder is not None:
        return [Step("Running; check again later.", (f"worker report {run}",))]
    failed, steps = summary.outcomes.get("failed", 0), []
    if not summary.finished or summary.not_attempted:
        left = f"{_n(summary.not_attempted)} {_was(summary.not_attempted)} not attempted."
        if not summary.finished:
            left = f"the run did not finish (the process died); {left}"
        again = f" It also runs again the {_n(failed)} that failed." if failed else ""
        steps.append(
            Step(
                f"Resume: {left}{again}",
                (resume_command(manifest.job, run, retry_failed=failed > 0),),
            )
        )
    if summary.effect_unknown:
        steps.append(Step(_unknown_words(summary), (f"worker verify {run}",)))
    if failed and not steps_resume(steps):
        steps.append(
            Step(
                f"{_n(failed)} failed: read why below and fix the cause; then validate "
                "the follow-up job (those targets only) and run it.",
                (
                    f"worker validate {run.followup}",
                    f"worker run {run.followup} --gateway {manifest.gateway}",
                ),
            )
        )
    return steps or [Step("Nothing to do: every target was cancelled or had nothing to cancel.")]


def steps_resume(steps: list[Step]) -> bool:
    """Whether the steps already resume the run (which runs the failed targets again)."""
    return any(" --resume " in command for step in steps for command in step.commands)


def _unknown_words(summary: Summary) -> str:
    """The effect-unknown step, with the last verify sweep's answer when there was one."""
    words = (
        f"{_n(summary.effect_unknown)} with an effect unknown (an answer was lost, or an "
        "earlier segment stopped or crashed while a call may have been out): search their "
        "devices for what is still pending."
    )
    verify = summary.verify
    if verify:
        words += (
            f" The last sweep searched {_n(verify.get('checked', 0))}: "
            f"{verify.get('still_pending', 0):,} still pending, {verify.get('unverified', 0):,} "
            "could not be searched."
        )
    return words


def _n(count: int) -> str:
    """A count of targets in words: "1 target", "1,024 targets"."""
    return f"{count:,} target" + ("" if count == 1 else "s")


def _was(count: int) -> str:
    """The verb agreeing with a count (a one-target resume reads "1 target was")."""
    return "was" if count == 1 else "were"
