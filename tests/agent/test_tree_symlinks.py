"""Symlinks and special files in a release tree: nginx follows links, so they are drift.

A link added as ``current/conf.d/zz-evil.conf`` is loaded by nginx through
``include conf.d/*.conf``; the tree listing records it (with its target, unfollowed),
so the live digest differs from the bundle's, ``intact()`` is False, the watchdog
reports it by name and a revert (or a re-apply) leaves a tree without it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import anyio
import pytest

from nxmesh.agent.applier import Applier
from nxmesh.agent.fsutil import describe_special, read_tree, special_entries
from nxmesh.agent.harness import NginxStack
from nxmesh.agent.watchdog import Watchdog, file_diff
from nxmesh.core.bundle import Bundle, bundle_digest
from nxmesh.plugins.nginx_driver.releases import ReleaseStore

BUNDLE = Bundle(
    {
        "nginx.conf": b"events {}\nhttp { include conf.d/*.conf; }\n",
        "conf.d/site-web.conf": b"server { listen 127.0.0.1:8080; }\n",
    }
)


@pytest.fixture
def store(tmp_path: Path) -> ReleaseStore:
    """A release store with `BUNDLE` written, committed and made ``current``."""
    store = ReleaseStore(tmp_path / "conf")
    name, staging = store.write(BUNDLE, durable=False)
    store.commit(staging, name)
    store.point_to(name)
    return store


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """An attacker's directory outside the tree: a config file and a directory of them."""
    directory = tmp_path / "outside"
    (directory / "evil.d").mkdir(parents=True)
    (directory / "evil.conf").write_text("server { listen 127.0.0.1:8081; }\n")
    (directory / "evil.d" / "x.conf").write_text("server { listen 127.0.0.1:8082; }\n")
    return directory


def _add_foreign(tree: Path, kind: str, outside: Path) -> str:
    """Put a `kind` entry into `tree`; return its path relative to the tree."""
    rel = {"file link": "conf.d/zz-evil.conf", "dir link": "conf.d/evil.d", "fifo": "conf.d/p"}
    path = tree / rel[kind]
    if kind == "file link":
        path.symlink_to(outside / "evil.conf")
    elif kind == "dir link":
        path.symlink_to(outside / "evil.d", target_is_directory=True)
    else:
        os.mkfifo(path)
    return rel[kind]


class TestReadTree:
    def test_a_clean_tree_reads_as_its_bundle(self, store: ReleaseStore) -> None:
        """The agent's own links (``current``, a prepared one) are outside the tree."""
        name = store.current_name()
        assert name is not None
        store.prepare_link(name)  # a leftover ``.current.tmp-*`` beside ``current``
        assert read_tree(store.path_of(name)) == dict(BUNDLE.files)
        assert read_tree(store.current_link) == dict(BUNDLE.files)  # the root link is read
        assert store.intact(name)
        assert store.find_intact(BUNDLE.digest) == name

    def test_symlinks_are_recorded_with_their_target_unfollowed(
        self, store: ReleaseStore, outside: Path
    ) -> None:
        tree = store.current_link
        _add_foreign(tree, "file link", outside)
        _add_foreign(tree, "dir link", outside)
        (tree / "conf.d" / "dangling.conf").symlink_to(outside / "missing.conf")
        files = read_tree(tree)
        assert special_entries(files) == {
            "conf.d/zz-evil.conf": f"a symlink (-> {outside / 'evil.conf'})",
            "conf.d/evil.d": f"a symlink (-> {outside / 'evil.d'})",
            "conf.d/dangling.conf": f"a symlink (-> {outside / 'missing.conf'})",
        }
        assert "conf.d/evil.d/x.conf" not in files  # not descended into
        assert not any(b"8081" in data or b"8082" in data for data in files.values())
        assert bundle_digest(files) != BUNDLE.digest

    def test_fifos_and_sockets_are_special_files(self, store: ReleaseStore) -> None:
        """A fifo is listed, not opened (reading it would block)."""
        tree = store.current_link
        os.mkfifo(tree / "fifo")
        with socket.socket(socket.AF_UNIX) as sock:
            sock.bind(str(tree / "sock"))
            found = special_entries(read_tree(tree))
        assert found == {"fifo": "a special file (fifo)", "sock": "a special file (socket)"}

    def test_file_content_is_not_a_stand_in(self) -> None:
        assert describe_special(b"server {}\n") is None
        assert describe_special(b"") is None


class TestIntact:
    @pytest.mark.parametrize("kind", ["file link", "dir link", "fifo"])
    def test_a_foreign_entry_makes_the_release_not_intact(
        self, store: ReleaseStore, outside: Path, kind: str
    ) -> None:
        """Not intact, not reused for the same digest, and the read-back check names it."""
        name = store.current_name()
        assert name is not None
        rel = _add_foreign(store.path_of(name), kind, outside)
        assert not store.intact(name)
        assert store.find_intact(BUNDLE.digest) is None
        what = "a special file (fifo)" if kind == "fifo" else "a symlink (-> "
        with pytest.raises(OSError, match="the bundle does not contain") as caught:
            store.check_tree(store.path_of(name), BUNDLE.digest)
        assert f"holds {rel}, {what}" in str(caught.value)

    def test_a_release_directory_that_is_a_link_is_not_intact(self, store: ReleaseStore) -> None:
        """Same files, but behind a link to a directory the agent did not write."""
        name = store.current_name()
        assert name is not None
        moved = store.root / "elsewhere"
        store.path_of(name).rename(moved)
        store.path_of(name).symlink_to(moved, target_is_directory=True)
        assert read_tree(store.current_link) == dict(BUNDLE.files)
        assert not store.intact(name)

    def test_the_drift_diff_names_the_link(self, store: ReleaseStore, outside: Path) -> None:
        """The link is named, with its target; the linked-to content is not shown."""
        _add_foreign(store.current_link, "file link", outside)
        diff = file_diff(BUNDLE.files, read_tree(store.current_link))
        evil = outside / "evil.conf"
        assert diff == f"conf.d/zz-evil.conf is a symlink (-> {evil}) the bundle does not contain\n"


# -- against a real nginx -------------------------------------------------------------------


def _evil_file(stack: NginxStack, outside: Path) -> Path:
    """A server nginx would load for ``evil.test``, written outside the tree."""
    evil = outside / "evil.conf"
    evil.write_text(
        f"server {{ listen 127.0.0.1:{stack.web_port}; server_name evil.test; return 200 evil; }}\n"
    )
    return evil


def _live_tree(stack: NginxStack) -> Path:
    return stack.layout.conf_dir / "current"


def _live_name(stack: NginxStack) -> str:
    name = stack.driver.store.current_name()
    assert name is not None
    return name


@pytest.mark.nginx
@pytest.mark.anyio
class TestSymlinkDrift:
    async def test_a_linked_file_nginx_loads_is_drift_and_reverted(
        self, stack: NginxStack, applier: Applier, outside: Path
    ) -> None:
        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="revert")
        assert await watchdog.check_drift() is None  # a clean tree is no drift
        evil = _evil_file(stack, outside)
        link = _live_tree(stack) / "conf.d" / "zz-evil.conf"
        link.symlink_to(evil)
        await stack.mode.signal_nginx("reload")  # nginx follows the link...
        with anyio.fail_after(10):
            while (await stack.fetch(host="evil.test")).text.strip() != "evil":
                await anyio.sleep(0.02)
        tampered = _live_name(stack)
        assert not stack.driver.store.intact(tampered)

        drift = await watchdog.check_drift()  # ...and the watchdog sees it
        assert drift is not None
        assert drift.added == ("conf.d/zz-evil.conf",)
        assert drift.changed == drift.removed == ()
        assert f"conf.d/zz-evil.conf is a symlink (-> {evil}) the bundle does not contain" in (
            drift.diff
        )
        assert stack.events.kinds()[-1] == "drift.reverted"
        assert stack.driver.store.current_name() != tampered
        assert not link.is_symlink()
        assert applier.current is not None
        assert read_tree(_live_tree(stack)) == dict(applier.current.bundle.files)
        assert (await stack.fetch(host="evil.test")).text.strip() == "original"
        assert await watchdog.check_drift() is None

    async def test_a_linked_directory_is_reported_then_reverted(
        self, stack: NginxStack, applier: Applier, outside: Path
    ) -> None:
        link = _live_tree(stack) / "conf.d" / "evil.d"
        link.symlink_to(outside / "evil.d", target_is_directory=True)
        reporter = Watchdog(applier, stack.driver, stack.mode, drift_policy="report")
        drift = await reporter.check_drift()
        assert drift is not None
        assert drift.added == ("conf.d/evil.d",)
        assert "conf.d/evil.d is a symlink (-> " in drift.diff
        assert not stack.driver.store.intact(_live_name(stack))
        assert link.is_symlink()  # report only

        reverter = Watchdog(applier, stack.driver, stack.mode, drift_policy="revert")
        assert await reverter.check_drift() is not None
        assert stack.events.kinds()[-1] == "drift.reverted"
        assert not link.is_symlink()
        assert await reverter.check_drift() is None
        assert await stack.body() == "original"

    async def test_reapplying_the_live_update_rewrites_a_tampered_tree(
        self, stack: NginxStack, applier: Applier, outside: Path
    ) -> None:
        """The live digest with a foreign link in its tree is no ``noop``."""
        link = _live_tree(stack) / "conf.d" / "zz-evil.conf"
        link.symlink_to(_evil_file(stack, outside))
        report = await applier.apply(stack.update(stack.state("original")))
        assert report.outcome == "applied", report.message
        assert not link.is_symlink()
        assert stack.driver.store.intact(_live_name(stack))

    async def test_current_repointed_outside_releases_is_drift_and_reverted(
        self, stack: NginxStack, applier: Applier, outside: Path
    ) -> None:
        """``current`` pointed at a tampered copy elsewhere (its last part still a release
        name) is drift: checking ``releases/<name>`` would have found nothing wrong."""
        import os
        import shutil

        name = _live_name(stack)
        copy = outside / "releases" / name
        shutil.copytree(stack.driver.store.path_of(name), copy)
        (copy / "conf.d" / "zz-evil.conf").write_text(_evil_file(stack, outside).read_text())
        current = _live_tree(stack)
        tmp = current.with_name("current.tmp")
        tmp.symlink_to(copy)
        os.replace(tmp, current)
        assert stack.driver.store.current_name() is None
        await stack.mode.signal_nginx("reload")
        with anyio.fail_after(10):
            while (await stack.fetch(host="evil.test")).text.strip() != "evil":
                await anyio.sleep(0.02)

        watchdog = Watchdog(applier, stack.driver, stack.mode, drift_policy="revert")
        drift = await watchdog.check_drift()
        assert drift is not None
        assert f"current -> {copy}, outside releases/" in drift.diff
        assert stack.events.kinds()[-1] == "drift.reverted"
        assert os.readlink(current) == f"releases/{stack.driver.store.current_name()}"
        assert (await stack.fetch(host="evil.test")).text.strip() == "original"
        assert await watchdog.check_drift() is None
