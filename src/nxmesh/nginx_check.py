"""Run ``nginx -t`` on a bundle in a throwaway prefix — never on a live tree.

The bundle is written to a fresh scratch directory that serves as both nginx's prefix
(``-p``: runtime files such as logs and temp dirs) and its configuration directory
(``-c <scratch>/nginx.conf``: where relative ``include`` and ``ssl_certificate`` paths
resolve). ``-e stderr`` keeps nginx from opening its compiled-in error log, so the check
needs no privileges and touches nothing outside the scratch directory.

`check_bundle` is synchronous (the CLI); `check_bundle_async` runs the same check from
anyio code (the agent) and kills nginx when cancelled or when the timeout expires.

For validating a state before its certificates exist (``nxmesh validate``),
``placeholder_certificates=True`` writes a throwaway self-signed certificate wherever the
configuration references a certificate and key that the bundle does not contain.
"""

from __future__ import annotations

import datetime
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import attrs
import crossplane

from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import NxMeshError

__all__ = [
    "DEFAULT_TIMEOUT",
    "RUNTIME_DIRS",
    "NginxCheckResult",
    "NginxNotFoundError",
    "check_bundle",
    "check_bundle_async",
    "find_nginx",
    "nginx_warnings",
    "prepare_prefix",
    "write_bundle",
    "write_placeholder_certificates",
]

DEFAULT_TIMEOUT = 60.0
"""Seconds ``nginx -t`` may take; large bundles parse in well under that."""

RUNTIME_DIRS = ("logs", "tmp")
"""Directories the built-in renderer's relative runtime paths need under the prefix.

nginx creates its temp directories but not their parents, and never creates log
directories.
"""

_SEARCH_DIRS = ("/usr/sbin", "/sbin", "/usr/local/sbin", "/usr/local/nginx/sbin")
_PRIVATE = (".key", ".pem")


# "2026/12/01 04:49:45 [warn] 123#123: <text>": the time and pid vary per line.
_WARNING = re.compile(r"\[warn\] (?:\d+#\d+: )?(.*\S)")


def nginx_warnings(output: str) -> list[str]:
    """The ``[warn]`` lines of nginx's output (``nginx -t``: an oversized hash, a
    directive it ignores), once each and without their time: a test that passes with
    them still says something an operator should read."""
    found = (_WARNING.search(line) for line in output.splitlines())
    return list(dict.fromkeys(m.group(1) for m in found if m))


class NginxNotFoundError(NxMeshError):
    """The nginx binary could not be found."""


@attrs.frozen
class NginxCheckResult:
    """The outcome of one ``nginx -t``.

    `output` is what nginx printed, with the scratch directory stripped from paths so
    they read as bundle paths (``conf.d/site-web.conf:12``).
    """

    ok: bool
    returncode: int | None
    output: str
    command: tuple[str, ...]
    duration: float
    timed_out: bool = False
    placeholders: tuple[str, ...] = ()

    @property
    def message(self) -> str:
        """A one-paragraph summary for people: nginx's own words on failure."""
        if self.timed_out:
            return f"nginx -t did not finish within the timeout\n{self.output}".rstrip()
        return self.output.strip() or ("ok" if self.ok else f"nginx -t exited {self.returncode}")


def find_nginx(binary: str = "nginx") -> str:
    """The path of `binary`: as given when it is a path, else looked up in PATH and sbin dirs.

    :raises NginxNotFoundError: nothing executable found.
    """
    if os.sep in binary:
        if os.access(binary, os.X_OK) and Path(binary).is_file():
            return binary
        raise NginxNotFoundError(f"nginx binary {binary!r} is not an executable file")
    found = shutil.which(binary) or shutil.which(binary, path=os.pathsep.join(_SEARCH_DIRS))
    if found is None:
        raise NginxNotFoundError(f"nginx binary {binary!r} not found in PATH or sbin dirs")
    return found


# ---------------------------------------------------------------------------------------
# Staging
# ---------------------------------------------------------------------------------------


def write_bundle(bundle: Bundle, root: Path) -> None:
    """Write every file of `bundle` under `root`; key files are created 0600."""
    for rel, data in bundle.files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if rel.endswith(_PRIVATE) else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)


def prepare_prefix(prefix: Path) -> None:
    """Create the runtime directories nginx needs under `prefix` (`RUNTIME_DIRS`)."""
    for name in RUNTIME_DIRS:
        (prefix / name).mkdir(parents=True, exist_ok=True)


def _certificate_pairs(root: Path, files: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(certificate, key) argument pairs of every block in `files`, in order."""
    for rel in files:
        parsed = crossplane.parse(
            str(root / rel), single=True, check_ctx=False, check_args=False, comments=False
        )
        stack: list[list[dict[str, Any]]] = [c["parsed"] for c in parsed["config"]]
        while stack:
            block = stack.pop()
            args = [(d["directive"], d["args"]) for d in block if d["args"]]
            certs = [a[0] for name, a in args if name == "ssl_certificate"]
            keys = [a[0] for name, a in args if name == "ssl_certificate_key"]
            yield from zip(certs, keys, strict=False)
            stack.extend(d["block"] for d in block if "block" in d)


def _inside(root: Path, rel: str) -> Path | None:
    """`rel` resolved under `root`, or None when it is absolute, variable or escapes."""
    if "$" in rel or os.path.isabs(rel):
        return None
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def write_placeholder_certificates(root: Path, bundle: Bundle) -> list[str]:
    """Write a throwaway self-signed certificate for every referenced, absent pair.

    Only pairs where *both* files are missing and both paths lie inside `root` get one:
    an absolute path or a half-present pair is the user's to fix, and nginx will say so.
    Returns the bundle-relative paths written.
    """
    candidates = [rel for rel, data in bundle.files.items() if b"ssl_certificate" in data]
    written: list[str] = []
    material: tuple[bytes, bytes] | None = None
    for cert, key in _certificate_pairs(root, candidates):
        cert_path, key_path = _inside(root, cert), _inside(root, key)
        if cert_path is None or key_path is None or cert_path.exists() or key_path.exists():
            continue
        material = material or _self_signed()
        for path, data, mode in ((cert_path, material[0], 0o644), (key_path, material[1], 0o600)):
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        written += [cert, key]
    return written


def _self_signed() -> tuple[bytes, bytes]:
    """A PEM (certificate, key) pair: EC P-256, one day, CN nxmesh-placeholder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nxmesh-placeholder")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


def _command(binary: str, root: Path) -> tuple[str, ...]:
    return (binary, "-t", "-p", f"{root}/", "-c", str(root / "nginx.conf"), "-e", "stderr")


def _stage(
    bundle: Bundle, scratch: Path | None, placeholders: bool
) -> tuple[Path, Path | None, tuple[str, ...]]:
    """Write the bundle into a new scratch dir; returns (root, dir to remove, placeholders)."""
    if scratch is None:
        owned = Path(tempfile.mkdtemp(prefix="nxmesh-check-"))
        root = owned
    else:
        owned = None
        root = Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        if any(root.iterdir()):
            raise NxMeshError(f"scratch directory {root} is not empty; nginx -t needs a fresh one")
    root = root.resolve()
    try:
        write_bundle(bundle, root)
        prepare_prefix(root)
        written = tuple(write_placeholder_certificates(root, bundle)) if placeholders else ()
    except BaseException:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise
    return root, owned, written


def _result(
    command: tuple[str, ...],
    root: Path,
    returncode: int | None,
    output: bytes,
    started: float,
    *,
    timed_out: bool = False,
    placeholders: tuple[str, ...] = (),
) -> NginxCheckResult:
    text = output.decode(errors="replace").replace(f"{root}/", "").replace(str(root), ".")
    return NginxCheckResult(
        ok=returncode == 0 and not timed_out,
        returncode=returncode,
        output=text,
        command=command,
        duration=time.monotonic() - started,
        timed_out=timed_out,
        placeholders=placeholders,
    )


# ---------------------------------------------------------------------------------------
# The check
# ---------------------------------------------------------------------------------------


def check_bundle(
    bundle: Bundle,
    *,
    binary: str = "nginx",
    timeout: float = DEFAULT_TIMEOUT,
    placeholder_certificates: bool = False,
    scratch: Path | None = None,
) -> NginxCheckResult:
    """Run ``nginx -t`` on `bundle` staged in a scratch prefix.

    :param binary: nginx executable name or path (see `find_nginx`).
    :param timeout: seconds before nginx is killed and the check fails.
    :param placeholder_certificates: write self-signed stand-ins for absent certificates.
    :param scratch: an empty directory to stage in and keep (for inspection); default a
        temporary directory removed afterwards.
    :raises NginxNotFoundError: no nginx binary.
    """
    path = find_nginx(binary)
    started = time.monotonic()
    root, owned, written = _stage(bundle, scratch, placeholder_certificates)
    command = _command(path, root)
    try:
        try:
            proc = subprocess.run(  # noqa: S603 - fixed argv, no shell
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:  # run() has killed nginx already
            partial = exc.output or b""
            return _result(
                command, root, None, partial, started, timed_out=True, placeholders=written
            )
        return _result(command, root, proc.returncode, proc.stdout, started, placeholders=written)
    finally:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)


async def check_bundle_async(
    bundle: Bundle,
    *,
    binary: str = "nginx",
    # A timeout is part of the result (timed_out, nginx's output so far), not an exception.
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109
    placeholder_certificates: bool = False,
    scratch: Path | None = None,
) -> NginxCheckResult:
    """`check_bundle` for anyio code: file work in a worker thread, nginx as a subprocess
    that is killed on timeout or cancellation; the scratch dir is removed even then."""
    path = find_nginx(binary)
    started = time.monotonic()
    root, owned, written = await anyio.to_thread.run_sync(
        _stage, bundle, scratch, placeholder_certificates
    )
    command = _command(path, root)
    try:
        with anyio.move_on_after(timeout) as scope:
            proc = await anyio.run_process(
                list(command), stdin=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False
            )
        if scope.cancelled_caught:
            return _result(command, root, None, b"", started, timed_out=True, placeholders=written)
        return _result(command, root, proc.returncode, proc.stdout, started, placeholders=written)
    finally:
        if owned is not None:
            with anyio.CancelScope(shield=True):
                await anyio.to_thread.run_sync(shutil.rmtree, owned, True)
