"""Turning the operator's command line and environment into run settings: credentials, gateway,
limits, run directory. Every refusal is a UsageError that says what to do instead.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import replace
from pathlib import Path
from urllib.parse import urlsplit

from worker.errors import UsageError, shown
from worker.jobs.units import assets_per_call as checked_assets_per_call
from worker.jobs.units import parse_duration, parse_rate, with_rate
from worker.model import Credentials, Job, Limits

ENV_KEY, ENV_SECRET, ENV_GATEWAY = "ENOS_APP_KEY", "ENOS_APP_SECRET", "ENOS_GATEWAY"


def load_credentials(path: Path | None) -> Credentials:
    """From --credentials FILE (ENOS_APP_KEY=... lines) or the environment."""
    values = _read_env_file(path) if path is not None else dict(os.environ)
    key, secret = values.get(ENV_KEY, "").strip(), values.get(ENV_SECRET, "").strip()
    origin = str(path) if path is not None else "the environment"
    if not key or not secret:
        raise UsageError(
            f"no credentials in {origin}: set {ENV_KEY} and {ENV_SECRET}, or pass "
            "--credentials FILE with those two lines"
        )
    return Credentials(key, secret)


def _read_env_file(path: Path) -> dict[str, str]:
    try:
        text = path.read_text(encoding="utf-8")
        mode = path.stat().st_mode
    except OSError as exc:
        raise UsageError(f"cannot read the credentials file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(
            f"the credentials file {path} can be read by others (mode {stat.S_IMODE(mode):03o}); "
            f"a secret must be readable by its owner only: chmod 600 {path}"
        )
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep:
            raise UsageError(f"{path}:{number}: expected NAME=value (e.g. {ENV_KEY}=...)")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def read_secret_file(path: Path) -> str:
    """A secret kept in a file of its own (owner-only), e.g. the simulator's app secret."""
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise UsageError(f"cannot read the secret file {path}: {exc.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise UsageError(f"the secret file {path} can be read by others; chmod 600 {path}")
    return text


def ca_bundle(path: Path | None) -> Path | None:
    """--ca-bundle FILE: a readable file of PEM certificates (checked before anything is sent)."""
    if path is None:
        return None
    if not path.is_file():
        raise UsageError(f"--ca-bundle {path}: no such file; give a PEM file of CA certificates")
    try:
        text = path.read_text(encoding="ascii", errors="replace")
    except OSError as exc:
        raise UsageError(f"--ca-bundle {path}: cannot read it: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--ca-bundle {path}: no PEM certificate (BEGIN CERTIFICATE) in it")
    return path


def resolve_gateway(flag: str | None, job: Job, *, insecure: bool) -> str:
    """--gateway, then ENOS_GATEWAY, then the job's gateway; TLS unless loopback or --insecure."""
    gateway = flag or os.environ.get(ENV_GATEWAY) or job.gateway
    if not gateway:
        raise UsageError(
            "no gateway: pass --gateway https://apim-..., set ENOS_GATEWAY, or add 'gateway:' to "
            f"{job.path}"
        )
    return check_gateway(gateway, insecure=insecure)


def check_gateway(gateway: str, *, insecure: bool) -> str:
    """An http(s) URL with a valid port; TLS unless loopback or --insecure."""
    parts = urlsplit(gateway)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"the gateway {shown(gateway)} is not an http(s) URL")
    try:
        parts.port  # noqa: B018 (it raises for a port out of range)
    except ValueError:
        raise UsageError(
            f"the gateway {shown(gateway)} has a port out of range; ports are 1 to 65535"
        ) from None
    if parts.scheme == "http" and not insecure and not _is_loopback(parts.hostname):
        raise UsageError(
            f"the gateway {gateway} is plain http on a non-loopback host; use https, or pass "
            "--insecure if you really mean it"
        )
    return gateway.rstrip("/")


def watcher_gateway(flag: str | None, *, insecure: bool) -> str:
    """``watch``: the watcher's own gateway, --gateway else ENOS_GATEWAY, required. Where the
    credentials go is the operator's decision, never a dropped job file's (design.md, "Spool
    trust"), so there is no fallback to a job's ``gateway:``."""
    gateway = flag or os.environ.get(ENV_GATEWAY)
    if not gateway:
        raise UsageError(
            "watch needs a gateway of its own: pass --gateway https://apim-... or set "
            f"{ENV_GATEWAY}. Every spooled job runs against it; a job file's 'gateway:' is "
            "never used (a job naming another gateway is refused)"
        )
    return check_gateway(gateway, insecure=insecure)


DEFAULT_PORTS = {"http": 80, "https": 443}
GatewayIdentity = tuple[str, str, int, str, str, str]


def gateway_identity(url: str) -> GatewayIdentity | None:
    """What makes two spellings of a gateway URL one place: the scheme and host in any case,
    the scheme's default port written or not, the path without trailing slashes (a path
    prefix is part of the place). Anything else that differs (user info, a query) is another
    place. None when it is no http(s) URL with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:  # a port out of range, a bad IPv6 literal
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme not in DEFAULT_PORTS or not host:
        return None
    userinfo = parts.netloc.rpartition("@")[0]
    path = parts.path.rstrip("/")
    return scheme, host, port or DEFAULT_PORTS[scheme], path, userinfo, parts.query


def same_gateway(one: str, other: str) -> bool:
    """Whether two gateway URLs name the same place (see :func:`gateway_identity`); a URL
    that cannot be read is the same as nothing."""
    mine = gateway_identity(one)
    return mine is not None and mine == gateway_identity(other)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def merge_limits(
    base: Limits,
    *,
    rate: str | None,
    concurrency: int | None,
    deadline: str | None,
    assets_per_call: int | None = None,
) -> Limits:
    """The job's (or the resumed run's) limits with the command line's overrides."""
    limits = base
    if rate is not None:
        try:
            limits = with_rate(limits, parse_rate(_number(rate)))
        except ValueError as exc:
            raise UsageError(
                f"--rate {rate}: {exc}; give requests per second (e.g. 20), 'auto' or 'unlimited'"
            ) from None
    if deadline is not None:
        try:
            limits = replace(limits, deadline=parse_duration(deadline))
        except ValueError as exc:
            raise UsageError(
                f"--deadline {deadline}: {exc}; give e.g. 90s, 45m, 2h or 1h30m"
            ) from None
    if concurrency is not None:
        if concurrency < 1:
            raise UsageError("--concurrency must be 1 or more")
        limits = replace(limits, concurrency=concurrency)
    if assets_per_call is not None:
        try:
            limits = replace(limits, assets_per_call=checked_assets_per_call(assets_per_call))
        except ValueError as exc:
            raise UsageError(f"--assets-per-call {assets_per_call}: {exc}; give 1 to 100") from None
    return limits


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text
