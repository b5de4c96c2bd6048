"""Reading the gateway's stated budget from headers: both families, case-insensitive, bounded,
and never a window the headers do not prove."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.budget import MAX_COUNT, Budget, Window, read_budget, window_end

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: a whole minute, hour and day


def read(headers: dict[str, str], now: float = T0 + 15.5, sent: float | None = None) -> Budget:
    """The budget the headers state, read `now`, the request sent 10 ms before."""
    budget = read_budget(headers, sent_at=now - 0.01 if sent is None else sent, now=now)
    assert budget is not None
    return budget


def test_x_ratelimit_windows_pace_to_the_tightest() -> None:
    """Each period's window ends at the next UTC boundary; the rate is the least any window
    allows: what is left spread to its end. Header names are case-insensitive."""
    budget = read(
        {
            "X-RateLimit-Limit-Second": "100",
            "x-ratelimit-remaining-second": "90",
            "X-RATELIMIT-LIMIT-MINUTE": "5000",
            "X-RateLimit-Remaining-Minute": "4000",
            "X-RateLimit-Remaining-Day": "9000000",
            "Content-Type": "application/json",
        }
    )
    seen = [(w.name, w.remaining, w.limit, round(w.reset_s, 3), w.length_s) for w in budget.windows]
    assert seen == [
        ("second", 90, 100, 0.5, 1.0),
        ("minute", 4000, 5000, 44.5, 60.0),
        ("day", 9_000_000, None, 16 * 3600 - 15.5, 86400.0),  # T0 is 08:00 UTC
    ]
    assert budget.rate() == pytest.approx(4000 / 44.5)
    assert budget.binding() is budget.windows[1]
    assert budget.describe() == "89.9/s (minute: 4,000 of 5,000 left, resets in 44 s)"
    assert budget.retry_after_s is None


@pytest.mark.parametrize(
    ("limit", "remaining"),
    [
        ("100", "-5"),  # negative
        ("100", "lots"),  # not a number
        ("100", "5.5"),  # not a count
        ("100", "1e3"),
        ("100", "101"),  # more left than the limit
        (str(10**12), "5"),  # a limit no gateway has
        ("100", str(MAX_COUNT + 1)),
        ("100", "1" * 17),  # too long to be read
        ("", "5"),  # a limit that is not one
    ],
)
def test_absurd_values_are_ignored(limit: str, remaining: str) -> None:
    """A window whose numbers cannot be a budget is left out, never guessed or clamped."""
    headers = {"X-RateLimit-Limit-Minute": limit, "X-RateLimit-Remaining-Minute": remaining}
    assert read_budget(headers, sent_at=T0 + 5, now=T0 + 5.1) is None


def test_periods_the_family_does_not_define_and_unrelated_headers_are_ignored() -> None:
    """Fortnight is not a period; no rate-limit header at all is no budget."""
    headers = {"X-RateLimit-Limit-Fortnight": "9", "X-RateLimit-Remaining-Fortnight": "1"}
    assert read_budget(headers, sent_at=T0, now=T0 + 1) is None
    assert read_budget({"Server": "x"}, sent_at=T0, now=T0 + 1) is None


def test_a_reading_across_a_window_boundary_is_not_taken_for_either_window() -> None:
    """Sent before the minute's end, read after it: the gateway may have counted it in either
    minute, so the minute is not read (nor the second); a reading within a quarter second of a
    boundary is not either, at our clock's word."""
    headers = {"X-RateLimit-Remaining-Second": "3", "X-RateLimit-Remaining-Minute": "2"}
    assert read_budget(headers, sent_at=T0 - 0.01, now=T0 + 0.01) is None
    late = read_budget(headers, sent_at=T0 + 59.85, now=T0 + 59.9)
    assert late is not None
    assert [w.name for w in late.windows] == ["second"]
    assert read(headers, now=T0 + 30.5).windows[1].reset_s == pytest.approx(29.5)


def test_calendar_windows_end_at_the_next_month_and_year() -> None:
    """Month and Year windows end at the UTC calendar's next month and year."""
    december = datetime(2027, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    new_year = datetime(2028, 1, 1, tzinfo=UTC).timestamp()
    assert window_end("month", december) == new_year
    assert window_end("year", december) == new_year
    assert window_end("month", T0) == datetime(2027, 2, 1, tzinfo=UTC).timestamp()
    budget = read({"X-RateLimit-Remaining-Month": "720", "X-RateLimit-Limit-Month": "1000"})
    assert budget.windows[0].reset_s == pytest.approx(
        datetime(2027, 2, 1, tzinfo=UTC).timestamp() - (T0 + 15.5)
    )


def test_ietf_window_with_its_policy() -> None:
    """RateLimit-Limit/-Remaining/-Reset describe one window (Reset: seconds to its end, whole
    seconds rounded up: the end is our clock's whole second), named by the policy item with
    its quota; the other policy windows bound the rate by their quota over their length."""
    budget = read(
        {
            "RateLimit-Limit": "5000",
            "RateLimit-Remaining": "1200",
            "RateLimit-Reset": "20",
            "RateLimit-Policy": "100;w=1, 5000;w=60",
        }
    )
    assert budget.windows == (
        Window("minute", 1200, 5000, 19.5, 60.0),  # read at T0 + 15.5
        Window("second", None, 100, 1.0, 1.0),
    )
    assert budget.rate() == pytest.approx(1200 / 19.5)
    alone = read({"ratelimit-limit": "10", "ratelimit-remaining": "4", "ratelimit-reset": "2"})
    assert alone.windows == (Window("window", 4, 10, 1.5, None),)
    exact = read({"RateLimit-Remaining": "4", "RateLimit-Reset": "2.25"})
    assert exact.windows == (Window("window", 4, None, 2.25, None),)


def test_with_both_families_the_x_ratelimit_one_is_read() -> None:
    """Both families (as newer gateways send): the X-RateLimit windows state every window
    exactly; the IETF one repeats one of them, rounded, and is not read."""
    budget = read(
        {
            "X-RateLimit-Limit-Minute": "5000",
            "X-RateLimit-Remaining-Minute": "4000",
            "RateLimit-Limit": "5000",
            "RateLimit-Remaining": "4000",
            "RateLimit-Reset": "45",
        }
    )
    assert [(w.name, w.reset_s) for w in budget.windows] == [("minute", 44.5)]


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Limit": "100, 100;w=60"},  # the draft's first versions
        {"RateLimit-Limit": "100", "RateLimit-Policy": '"default";q=100;w=60'},  # later ones
    ],
)
def test_ietf_policy_forms(headers: dict[str, str]) -> None:
    """Both forms of the policy name the stated window."""
    stated = read({**headers, "RateLimit-Remaining": "50", "RateLimit-Reset": "30"})
    assert stated.windows == (Window("minute", 50, 100, 29.5, 60.0),)


@pytest.mark.parametrize(
    "headers",
    [
        {"RateLimit-Limit": "10", "RateLimit-Remaining": "4", "RateLimit-Reset": "-1"},
        {"RateLimit-Limit": "10", "RateLimit-Remaining": "4", "RateLimit-Reset": "99999999999"},
        {"RateLimit-Limit": "10", "RateLimit-Remaining": "40", "RateLimit-Reset": "3"},
        {"RateLimit-Limit": "x", "RateLimit-Remaining": "4", "RateLimit-Reset": "3"},
        {"RateLimit-Remaining": "4"},
        {"RateLimit-Policy": "100;w=0, 5;w=x, " + "9;w=1," * 100},
    ],
)
def test_ietf_values_that_cannot_be_a_budget_are_ignored(headers: dict[str, str]) -> None:
    """A reset that is negative or a year away, more left than the limit, a limit that is not
    a number, no reset, a policy of zero-length or unreadable windows (or too long to read)."""
    assert read_budget(headers, sent_at=T0, now=T0 + 1) is None


def test_retry_after_is_kept_uncapped_but_bounded() -> None:
    """Retry-After as seconds or an HTTP date, uncapped (a day's wait says "quota"), at most a
    year; garbage is ignored."""
    assert read({"Retry-After": "43200"}).retry_after_s == 43200.0
    date = "Fri, 15 Jan 2027 08:01:00 GMT"
    assert read({"Retry-After": date}, now=T0 + 15.5).retry_after_s == pytest.approx(44.5)
    for bad in ("soon", "99999999999", "-3", "Fri, 15 Jan 2027 08:01:00", "1" * 70):
        assert read_budget({"Retry-After": bad}, sent_at=T0, now=T0) is None
