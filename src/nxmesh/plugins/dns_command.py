"""The ``command`` DNS provider: DNS-01 records published by a program you configure.

The reference `nxmesh.core.interfaces.DnsProvider`: for each record it runs
``[plugins.certs] dns_command`` (an argv list, never a shell string) with one more
argument, ``add`` or ``remove``, and this environment:

- ``NXMESH_DNS_ACTION``: ``add`` or ``remove``;
- ``NXMESH_DNS_RECORD_NAME``: ``_acme-challenge.example.com.`` (fully qualified);
- ``NXMESH_DNS_RECORD_VALUE``: the TXT value;
- ``NXMESH_DNS_DOMAIN``: the domain being validated (``example.com``);
- ``PATH``, ``HOME``, ``LANG`` from the master, plus ``dns_command_env`` entries
  (``NAME=value``). Nothing else of the master's environment is passed: it may hold the
  master key.

Exit status 0 means done; anything else, or running past ``dns_command_timeout``, is a
`DnsProviderError` carrying the program's stderr. An nsupdate script is the classic use::

    #!/bin/sh
    # nxmesh dns_command: add|remove with the record in the environment
    ttl=60
    [ "$1" = add ] && op="update add $NXMESH_DNS_RECORD_NAME $ttl TXT $NXMESH_DNS_RECORD_VALUE"
    [ "$1" = remove ] && op="update delete $NXMESH_DNS_RECORD_NAME TXT $NXMESH_DNS_RECORD_VALUE"
    printf 'server ns1.example.com\\n%s\\nsend\\n' "$op" | nsupdate -k /etc/nxmesh/tsig.key
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, ClassVar

import anyio
import anyio.abc
import structlog

from nxmesh import hookimpl
from nxmesh.certs.errors import DnsProviderError
from nxmesh.certs.settings import certs_settings
from nxmesh.core.errors import ConfigurationError

if TYPE_CHECKING:
    from nxmesh.core.interfaces import DnsProvider
    from nxmesh.core.settings import Settings

__all__ = ["INHERITED_ENV", "CommandDnsProvider", "nxmesh_register_dns_providers"]

INHERITED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ")
"""The only variables of the master's environment the command sees."""

_OUTPUT_LIMIT = 16 * 1024

log = structlog.get_logger("nxmesh.plugins.dns_command")


async def _drain(stream: anyio.abc.ByteReceiveStream | None, into: bytearray) -> None:
    if stream is None:
        return
    async for chunk in stream:
        if len(into) < _OUTPUT_LIMIT:
            into.extend(chunk[: _OUTPUT_LIMIT - len(into)])


class CommandDnsProvider:
    """Runs a configured program to add and remove DNS-01 TXT records.

    :param command: argv of the program; ``add``/``remove`` is appended.
    :param timeout: seconds one run may take before it is killed.
    :param env: extra environment variables for the program.
    """

    name: ClassVar[str] = "command"

    def __init__(
        self,
        command: Sequence[str],
        *,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> None:
        if not command or not command[0]:
            raise ConfigurationError(
                "the command DNS provider needs [plugins.certs] dns_command: the argv of the "
                "program that adds and removes TXT records"
            )
        self.command = tuple(command)
        self.timeout = timeout
        self.env = dict(env or {})

    def __repr__(self) -> str:
        return f"CommandDnsProvider(command={self.command[0]!r}, timeout={self.timeout})"

    @classmethod
    def from_settings(cls, settings: Settings) -> CommandDnsProvider:
        certs = certs_settings(settings)
        env = dict(item.split("=", 1) for item in certs.dns_command_env)
        return cls(certs.dns_command, timeout=certs.dns_command_timeout, env=env)

    async def add_txt(self, record_name: str, value: str) -> None:
        await self._run("add", record_name, value)

    async def remove_txt(self, record_name: str, value: str) -> None:
        await self._run("remove", record_name, value)

    def _environment(self, action: str, record_name: str, value: str) -> dict[str, str]:
        env = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        env.update(self.env)
        domain = record_name.rstrip(".").removeprefix("_acme-challenge.")
        env.update(
            NXMESH_DNS_ACTION=action,
            NXMESH_DNS_RECORD_NAME=record_name,
            NXMESH_DNS_RECORD_VALUE=value,
            NXMESH_DNS_DOMAIN=domain,
        )
        return env

    async def _run(self, action: str, record_name: str, value: str) -> None:
        argv = [*self.command, action]
        what = f"dns_command {self.command[0]} {action} {record_name}"
        stdout, stderr = bytearray(), bytearray()
        try:
            process = await anyio.open_process(
                argv,
                stdin=subprocess.DEVNULL,
                env=self._environment(action, record_name, value),
            )
        except OSError as exc:
            raise DnsProviderError(f"cannot run {what}: {exc.strerror or exc}") from None
        async with process:
            try:
                with anyio.fail_after(self.timeout):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(_drain, process.stdout, stdout)
                        tg.start_soon(_drain, process.stderr, stderr)
                    returncode = await process.wait()
            except TimeoutError:
                process.kill()
                with anyio.CancelScope(shield=True):
                    await process.wait()
                raise DnsProviderError(
                    f"{what} did not finish within {self.timeout:g} s and was killed",
                    stderr=stderr.decode(errors="replace"),
                ) from None
        if returncode != 0:
            raise DnsProviderError(
                f"{what} failed with exit status {returncode}",
                stderr=stderr.decode(errors="replace"),
                returncode=returncode,
            )
        log.debug("dns_command ran", action=action, record=record_name)


@hookimpl(trylast=True)
def nxmesh_register_dns_providers() -> Sequence[type[DnsProvider]]:
    return [CommandDnsProvider]
