"""Whether nginx's workers can reach the files they open per request: the check itself,
and the warning an apply's report carries, against a real nginx."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nxmesh.agent.harness import NginxStack
from nxmesh.agent.process import worker_pids
from nxmesh.plugins.nginx_driver.reach import closed_directory, credentials_of
from nxmesh.testing.nginx import readable_root

NOBODY = (65534, frozenset({65534}))


class TestClosedDirectory:
    def test_the_first_directory_a_user_cannot_enter(self) -> None:
        """Search permission is read as owner, group member or other, from / down; the
        path itself counts; root enters anything."""
        with readable_root() as base:
            self._check(base)

    def _check(self, base: Path) -> None:
        outer = base / "outer"
        inner = outer / "inner"
        inner.mkdir(parents=True)
        outer.chmod(0o700)
        assert closed_directory(inner, NOBODY) == outer
        outer.chmod(0o711)
        assert closed_directory(inner, NOBODY) is None
        inner.chmod(0o750)
        assert closed_directory(inner, NOBODY) == inner
        os.chown(inner, 0, 65534)  # nobody's group may enter
        assert closed_directory(inner, NOBODY) is None
        os.chown(inner, 65534, 0)
        inner.chmod(0o077)  # the owner's own bits say no, whatever others may
        assert closed_directory(inner, NOBODY) == inner
        assert closed_directory(inner, (0, frozenset({0}))) is None

    def test_a_link_into_a_closed_directory(self) -> None:
        """The workers also traverse the directories above a link's target: a
        configuration root reached through a link into a private directory is closed."""
        with readable_root() as base:
            (base / "private" / "real").mkdir(parents=True)
            (base / "private").chmod(0o700)
            (base / "public").mkdir()
            (base / "public" / "link").symlink_to("../private/real")
            (base / "public" / "link" / "releases").mkdir()
            assert closed_directory(base / "public" / "link" / "releases", NOBODY) == (
                base / "private"
            )

    def test_a_missing_path_says_nothing(self) -> None:
        with readable_root() as base:
            assert closed_directory(base / "not" / "there", NOBODY) is None

    def test_credentials_of_this_process(self) -> None:
        uid, groups = credentials_of(os.getpid()) or (-1, frozenset())
        assert uid == os.geteuid()
        assert os.getegid() in groups
        assert set(os.getgroups()) <= groups


@pytest.fixture
async def private_stack(
    nginx_binary: str, tmp_path: Path, anyio_backend: str
) -> AsyncIterator[NginxStack]:
    """nginx under pytest's private temporary directory (0700): its workers, running as
    nobody when the tests run as root, cannot enter it."""
    async with NginxStack(root=tmp_path / "nginx", nginx_binary=nginx_binary) as stack:
        yield stack


@pytest.mark.anyio
@pytest.mark.nginx
class TestTheApplySays:
    async def test_workers_locked_out_of_the_tree_are_reported(
        self, private_stack: NginxStack
    ) -> None:
        """nginx serves (the reload succeeded), but the workers cannot open the files
        under the tree: the report is `applied` and says so, naming the directory."""
        if os.geteuid() != 0:
            pytest.skip("only a root master runs its workers as another user")
        stack = private_stack
        state = stack.state("a")
        report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message
        assert "warning: nginx's workers (uid " in report.message
        closed = closed_directory(stack.layout.conf_dir, _worker_credentials(stack))
        assert closed is not None
        assert f"cannot enter {closed} (mode 0700)" in report.message
        assert (await stack.body()) == "a"
        # Applying it again changes nothing, and the report still says so.
        again = await stack.driver.apply(stack.update(state), stack.render(state))
        assert again.outcome == "noop", again.message
        assert f"warning: nginx's workers (uid {_worker_credentials(stack)[0]})" in again.message

    async def test_no_warning_when_they_can(self, nginx_binary: str, anyio_backend: str) -> None:
        with readable_root() as base:
            async with NginxStack(root=base / "nginx", nginx_binary=nginx_binary) as stack:
                state = stack.state("b")
                report = await stack.driver.apply(stack.update(state), stack.render(state))
        assert report.outcome == "applied", report.message
        assert "warning" not in report.message


def _worker_credentials(stack: NginxStack) -> tuple[int, frozenset[int]]:
    """Who the stack's nginx workers run as."""
    pid = stack.layout.pid_file.read_text().strip()
    worker = next(iter(worker_pids(int(pid))))
    found = credentials_of(worker)
    assert found is not None
    return found


@pytest.mark.anyio
@pytest.mark.nginx
async def test_a_relative_configuration_root_works(
    nginx_binary: str, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relative ``agent.conf_dir`` is taken from the agent's working directory: nginx
    resolved the relative ``-p`` against its own (``nginx -t`` runs from a scratch one),
    and every apply failed."""
    with readable_root() as base:
        monkeypatch.chdir(base)
        async with NginxStack(root=Path("nginx"), nginx_binary=nginx_binary) as stack:
            assert stack.layout.conf_dir == base / "nginx"
            state = stack.state("relative")
            report = await stack.driver.apply(stack.update(state), stack.render(state))
            assert report.outcome == "applied", report.message
            assert await stack.body() == "relative"
