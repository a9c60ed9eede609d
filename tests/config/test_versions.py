"""Config versions: content digests, the signed hash chain, tamper detection and rollback."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import anyio
import attrs
import pytest
from click.testing import CliRunner

from nxmesh.cli import build_cli, versions_cmd
from nxmesh.cli.context import CliContext
from nxmesh.cli.versions_cmd import EXIT_BROKEN, EXIT_ERROR, versions_group
from nxmesh.config.versions import (
    VersionError,
    new_version,
    require_verified,
    rollback_version,
    signing_payload,
    state_digest,
    verify_chain,
    version_hash,
)
from nxmesh.core.markers import hookimpl
from nxmesh.core.model import ConfigVersion, DesiredState
from nxmesh.core.pluginmanager import NxMeshPluginManager
from nxmesh.core.registry import ProviderRegistries
from nxmesh.core.serialization import canonical_json
from nxmesh.crypto.signing import SigningKey
from nxmesh.testing.factories import make_state
from nxmesh.testing.services import require_module

T0 = 1_700_000_000.25


def build_chain(
    signer: SigningKey, states: Sequence[DesiredState], *, start: float = T0
) -> list[ConfigVersion]:
    """Versions 1..n of `states`, oldest first, one second apart."""
    chain: list[ConfigVersion] = []
    for i, state in enumerate(states):
        chain.append(
            new_version(
                state,
                previous=chain[-1] if chain else None,
                author="alice",
                message=f"change {i + 1}",
                signer=signer,
                now=start + i,
            )
        )
    return chain


def problems_of(chain: Sequence[ConfigVersion], signer: SigningKey) -> list[str]:
    return [str(p) for p in verify_chain(chain, signer.verify_key)]


@pytest.fixture(scope="module")
def signer() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture(scope="module")
def chain(signer: SigningKey) -> list[ConfigVersion]:
    return build_chain(signer, [make_state(n) for n in (1, 2, 3, 4)])


class TestDigests:
    def test_state_digest_is_sha256_of_canonical_json(self) -> None:
        """The content digest is the hex sha256 of the state's canonical JSON."""
        state = make_state(2)
        assert state_digest(state) == hashlib.sha256(canonical_json(state)).hexdigest()

    def test_equal_content_has_equal_digest(self) -> None:
        """Two separately built equal states share a digest; other content does not."""
        assert state_digest(make_state(3)) == state_digest(make_state(3))
        assert state_digest(make_state(3)) != state_digest(make_state(3, port=9000))

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("workspace", "other"),
            ("number", 99),
            ("digest", "f" * 64),
            ("parent_digest", "e" * 64),
            ("author", "mallory"),
            ("message", "change 1 "),
            ("created_at", T0 + 0.001),
            ("key_id", "0123456789abcdef"),
        ],
    )
    def test_payload_covers_every_field(
        self, chain: list[ConfigVersion], field: str, value: object
    ) -> None:
        """Changing any metadata field changes the signed payload and the version hash."""
        version = chain[1]
        edited = attrs.evolve(version, **{field: value})
        assert signing_payload(edited) != signing_payload(version)
        assert version_hash(edited) != version_hash(version)

    def test_payload_excludes_the_signature(self, chain: list[ConfigVersion]) -> None:
        """The signature is not part of what it signs."""
        version = chain[0]
        assert signing_payload(attrs.evolve(version, signature="")) == signing_payload(version)

    def test_payload_is_canonical_json(self, chain: list[ConfigVersion]) -> None:
        """The payload is sorted, compact JSON with a type tag for domain separation."""
        payload = signing_payload(chain[0])
        data = json.loads(payload)
        assert data["type"] == "nxmesh.config-version/1"
        assert data["number"] == 1
        assert data["parent_digest"] is None
        assert payload == json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


class TestNewVersion:
    def test_first_version(self, signer: SigningKey) -> None:
        """The first version of a workspace is number 1 without a parent, signed by the key."""
        state = make_state(1)
        version = new_version(
            state, previous=None, author="alice", message="init", signer=signer, now=T0
        )
        assert version.number == 1
        assert version.parent_digest is None
        assert version.digest == state_digest(state)
        assert version.created_at == T0
        assert version.key_id == signer.key_id
        assert signer.verify_key.verify(signing_payload(version), version.signature)
        assert version.workspace == state.workspace

    def test_next_version_links_to_the_previous_version_hash(
        self, chain: list[ConfigVersion]
    ) -> None:
        """Each version's parent link is the version hash of the one before it."""
        for previous, version in itertools.pairwise(chain):
            assert version.number == previous.number + 1
            assert version.parent_digest == version_hash(previous)

    def test_current_time_is_the_default(self, signer: SigningKey) -> None:
        """Without `now`, the version is stamped with the current time."""
        before = time.time()
        version = new_version(make_state(), previous=None, author="a", message="", signer=signer)
        assert before <= version.created_at <= time.time()

    def test_other_workspace_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A state cannot be chained after a version of another workspace."""
        with pytest.raises(VersionError, match="workspace 'blue'"):
            new_version(
                make_state(workspace="blue"),
                previous=chain[-1],
                author="a",
                message="",
                signer=signer,
            )

    def test_a_fresh_chain_verifies(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """A chain built by new_version has no problems, whatever order it is given in."""
        assert problems_of(chain, signer) == []
        assert problems_of(list(reversed(chain)), signer) == []
        assert problems_of([], signer) == []


class TestVerifyChain:
    def test_edited_state_names_the_version(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Replacing a stored state (digest left alone) is reported as an edited state."""
        tampered = list(chain)
        tampered[1] = attrs.evolve(chain[1], state=make_state(2, port=6666))
        problems = problems_of(tampered, signer)
        assert len(problems) == 1
        assert problems[0].startswith("version 2: state was edited")

    def test_edited_message_names_the_version_and_breaks_the_next_link(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Changing a stored message fails that version's signature and the next parent link."""
        tampered = list(chain)
        tampered[2] = attrs.evolve(chain[2], message="nothing to see here")
        problems = problems_of(tampered, signer)
        assert problems == [
            "version 3: signature does not match: its metadata (number, author, message, time, "
            "digest or parent link) was edited, or another key signed it",
            "version 4: parent link broken: it does not match version 3 (version 3 was altered, "
            "replaced, or this link was edited)",
        ]

    def test_rehashed_history_still_fails_signatures(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Rewriting a state and recomputing every digest and link cannot forge signatures."""
        forged: list[ConfigVersion] = list(chain[:1])
        evil = make_state(2, port=6666)
        forged.append(
            attrs.evolve(
                chain[1],
                state=evil,
                digest=state_digest(evil),
                parent_digest=version_hash(chain[0]),
            )
        )
        for version in chain[2:]:
            forged.append(attrs.evolve(version, parent_digest=version_hash(forged[-1])))
        problems = problems_of(forged, signer)
        assert [p.split(":")[0] for p in problems] == ["version 2", "version 3", "version 4"]
        assert all("signature does not match" in p for p in problems)

    def test_swapped_versions_are_detected(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Swapping the numbers of two stored versions breaks signatures and links."""
        tampered = list(chain)
        tampered[1] = attrs.evolve(chain[2], number=2)
        tampered[2] = attrs.evolve(chain[1], number=3)
        problems = problems_of(tampered, signer)
        named = {p.split(":")[0] for p in problems}
        assert {"version 2", "version 3"} <= named
        assert any("parent link broken" in p for p in problems)

    def test_swapped_rows_of_intact_versions_are_fine(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Storage order is irrelevant; only the numbers and links matter."""
        assert problems_of([chain[2], chain[0], chain[3], chain[1]], signer) == []

    def test_dropped_version_is_a_gap(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """A deleted version is reported as missing before the next one."""
        assert problems_of([chain[0], chain[2], chain[3]], signer) == [
            "version 3: version 2 is missing before it"
        ]

    def test_dropped_first_versions_are_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A history that does not start at 1 lists the missing range."""
        assert problems_of(chain[2:], signer) == ["version 3: versions 1..2 are missing before it"]

    def test_duplicate_number_is_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Two versions with the same number are reported."""
        problems = problems_of([*chain, chain[1]], signer)
        assert problems == ["version 2: number is used by more than one version"]

    def test_forked_version_is_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A second, validly signed version 3 (a fork) is reported as a duplicate."""
        fork = new_version(
            make_state(9), previous=chain[1], author="bob", message="fork", signer=signer
        )
        problems = problems_of([*chain, fork], signer)
        assert problems[0] == "version 3: number is used by more than one version"

    def test_wrong_key_fails_every_version(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Verifying with another master's key reports every version's key and signature."""
        other = SigningKey.generate()
        problems = [str(p) for p in verify_chain(chain, other.verify_key)]
        assert len(problems) == 2 * len(chain)
        expected = f"signed by key {signer.key_id}, but the master's key is {other.key_id}"
        assert f"version 1: {expected}" in problems

    def test_unsigned_version_is_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A version whose signature was blanked is reported as unsigned."""
        tampered = [chain[0], attrs.evolve(chain[1], signature=""), *chain[2:]]
        assert problems_of(tampered, signer) == ["version 2: is not signed"]

    def test_first_version_with_a_parent_is_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Version 1 must not point at a parent (a spliced-in history)."""
        first = new_version(make_state(), previous=chain[-1], author="a", message="", signer=signer)
        first = attrs.evolve(first, number=1)
        problems = problems_of([first], signer)
        assert "version 1: is the first version but has a parent link" in problems

    def test_other_workspace_is_reported(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A version of another workspace mixed into the history is named."""
        tampered = [attrs.evolve(chain[0], workspace="blue"), *chain[1:]]
        assert "version 1: belongs to workspace 'blue', not 'default'" in problems_of(
            tampered, signer
        )


class TestRollback:
    def test_rollback_repeats_content_in_a_new_version(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Rolling back appends a version with the target's state and digest."""
        rolled = rollback_version(chain[0], previous=chain[-1], author="bob", signer=signer)
        assert rolled.state == chain[0].state
        assert rolled.digest == chain[0].digest
        assert rolled.number == chain[-1].number + 1
        assert rolled.parent_digest == version_hash(chain[-1])
        assert rolled.message == "rollback to version 1"
        assert rolled.author == "bob"

    def test_custom_message(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """An explicit message replaces the default one."""
        rolled = rollback_version(
            chain[1], previous=chain[-1], author="bob", signer=signer, message="bad deploy"
        )
        assert rolled.message == "bad deploy"

    def test_chain_with_rollbacks_verifies_and_links_stay_unique(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """After rollbacks repeat content, every parent link still names exactly one version."""
        history = list(chain)
        history.append(rollback_version(chain[0], previous=history[-1], author="b", signer=signer))
        history.append(rollback_version(chain[3], previous=history[-1], author="b", signer=signer))
        history.append(rollback_version(chain[0], previous=history[-1], author="b", signer=signer))
        assert problems_of(history, signer) == []
        assert len({v.digest for v in history}) == 4
        links = [v.parent_digest for v in history[1:]]
        assert len(set(links)) == len(links)

    def test_tampering_with_a_rolled_back_duplicate_is_caught(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """Swapping a version for an earlier one with the same content breaks the chain."""
        rolled = rollback_version(chain[0], previous=chain[-1], author="b", signer=signer)
        after = new_version(make_state(7), previous=rolled, author="b", message="", signer=signer)
        # Same content as version 1, relabelled as version 5: digest matches, link does not.
        impostor = attrs.evolve(chain[0], number=5, parent_digest=rolled.parent_digest)
        problems = problems_of([*chain, impostor, after], signer)
        assert any(p.startswith("version 5: signature does not match") for p in problems)
        assert any(p.startswith("version 6: parent link broken") for p in problems)

    def test_tampered_target_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A target whose state does not match its digest is not rolled back to."""
        target = attrs.evolve(chain[0], state=make_state(5))
        with pytest.raises(VersionError, match="refusing to roll back to version 1"):
            rollback_version(target, previous=chain[-1], author="b", signer=signer)

    def test_re_digested_target_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """An edited state with a recomputed digest fails the signature: no rollback signs it."""
        evil = make_state(1, port=6666)
        target = attrs.evolve(chain[0], state=evil, digest=state_digest(evil))
        with pytest.raises(VersionError) as caught:
            rollback_version(target, previous=chain[-1], author="b", signer=signer)
        message = str(caught.value)
        assert message.startswith("refusing to roll back to version 1: the stored version 1 ")
        assert "fails verification (signature does not match" in message
        assert "nxmesh versions verify" in message

    def test_target_signed_by_another_key_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A version signed by another key (planted whole in the database) is refused."""
        forged = build_chain(SigningKey.generate(), [make_state(1, port=6666)])[0]
        with pytest.raises(VersionError, match="version 1 of workspace 'default' fails"):
            rollback_version(forged, previous=chain[-1], author="b", signer=signer)

    def test_tampered_previous_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """The version the rollback links to must verify too."""
        latest = attrs.evolve(chain[-1], message="nothing to see here")
        with pytest.raises(VersionError, match=r"the latest version 4 .* fails verification"):
            rollback_version(chain[0], previous=latest, author="b", signer=signer)

    def test_explicit_verify_key(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """`verify_key` replaces the signer's own key for the checks."""
        other = SigningKey.generate()
        with pytest.raises(VersionError, match="fails verification"):
            rollback_version(
                chain[0], previous=chain[-1], author="b", signer=signer, verify_key=other.verify_key
            )
        rolled = rollback_version(
            chain[0], previous=chain[-1], author="b", signer=other, verify_key=signer.verify_key
        )
        assert rolled.key_id == other.key_id

    def test_require_verified(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """Silent on an intact version; otherwise names it and every problem found."""
        require_verified(chain[1], signer.verify_key, refusing="x")
        broken = attrs.evolve(chain[1], state=make_state(9), signature="")
        with pytest.raises(VersionError) as caught:
            require_verified(
                broken, signer.verify_key, refusing="commit a change", what="the latest"
            )
        assert str(caught.value) == (
            "refusing to commit a change: the latest version 2 of workspace 'default' fails "
            f"verification (state was edited: it hashes to {state_digest(make_state(9))[:12]}..., "
            f"the recorded digest is {chain[1].digest[:12]}...; is not signed); it was altered "
            "after it was stored: run `nxmesh versions verify`"
        )

    def test_newer_target_is_refused(self, chain: list[ConfigVersion], signer: SigningKey) -> None:
        """Rolling back to a version after `previous` is an error."""
        with pytest.raises(VersionError, match="the latest is 2"):
            rollback_version(chain[3], previous=chain[1], author="b", signer=signer)

    def test_other_workspace_target_is_refused(
        self, chain: list[ConfigVersion], signer: SigningKey
    ) -> None:
        """A version of another workspace cannot be rolled back to."""
        blue = new_version(
            make_state(workspace="blue"), previous=None, author="a", message="", signer=signer
        )
        with pytest.raises(VersionError, match="workspace 'blue'"):
            rollback_version(blue, previous=chain[-1], author="b", signer=signer)


# ---------------------------------------------------------------------------------------
# nxmesh versions verify
# ---------------------------------------------------------------------------------------


class ListStorage:
    """A StorageBackend over a list per URL: just enough for the verify command."""

    name: ClassVar[str] = "list"
    schemes: ClassVar[tuple[str, ...]] = ("list",)
    rows: ClassVar[dict[str, list[ConfigVersion]]] = {}
    calls: ClassVar[list[tuple[str, Any]]] = []

    def __init__(self, url: str) -> None:
        self.url = url

    @classmethod
    def from_settings(cls, settings: Any) -> ListStorage:
        """How a backend reads its plugin's settings section (the PostgreSQL pool)."""
        cls.calls.append(("from_settings", settings.storage_url))
        return cls(settings.storage_url)

    async def open(self) -> None:
        self.calls.append(("open", self.url))

    async def aclose(self) -> None:
        self.calls.append(("aclose", self.url))

    async def add_version(self, version: ConfigVersion) -> None:
        self.rows.setdefault(self.url, []).append(version)

    async def list_versions(
        self, workspace: str, *, limit: int = 100, before: int | None = None
    ) -> Sequence[ConfigVersion]:
        self.calls.append(("list", before))
        if self.url.endswith("/broken"):
            raise OSError("disk on fire")
        found = [
            v
            for v in self.rows.get(self.url, [])
            if v.workspace == workspace and (before is None or v.number < before)
        ]
        return sorted(found, key=lambda v: v.number, reverse=True)[:limit]


class ListStoragePlugin:
    @hookimpl
    def nxmesh_register_storage_backends(self) -> list[type[Any]]:
        return [ListStorage]


@pytest.fixture
def storage() -> dict[str, list[ConfigVersion]]:
    ListStorage.rows = {}
    ListStorage.calls = []
    return ListStorage.rows


@pytest.fixture
def public_key(tmp_path: Path, signer: SigningKey) -> Path:
    path = tmp_path / "signing.pub"
    path.write_text(signer.public_key_pem())
    return path


@pytest.fixture
def run_verify(
    make_plugin_manager: Callable[..., NxMeshPluginManager], tmp_path: Path
) -> Callable[..., Any]:
    pm = make_plugin_manager(ListStoragePlugin())

    def run(*args: str, config: Path | None = None) -> Any:
        return CliRunner().invoke(
            versions_group, ["verify", *args], obj=CliContext(pm=pm, config_path=config)
        )

    return run


class TestVerifyCommand:
    def test_intact_chain_exits_zero(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        public_key: Path,
        run_verify: Callable[..., Any],
        signer: SigningKey,
    ) -> None:
        """An untouched history verifies: exit 0 and a one-line summary."""
        storage["list://db"] = list(chain)
        result = run_verify("--storage", "list://db", "--public-key", str(public_key))
        assert result.exit_code == 0, result.output
        assert result.stdout == (
            f"intact: 4 versions in workspace 'default', signed by key {signer.key_id}\n"
        )
        # Built from the settings read for the workspace, then opened and closed.
        assert ListStorage.calls[:2] == [("from_settings", "list://db"), ("open", "list://db")]
        assert ListStorage.calls[-1] == ("aclose", "list://db")

    def test_edited_row_exits_one_naming_it(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """An edited message makes the command exit 1 and list each problem."""
        storage["list://db"] = [chain[0], attrs.evolve(chain[1], message="edited"), *chain[2:]]
        result = run_verify("--storage", "list://db", "--public-key", str(public_key))
        assert result.exit_code == EXIT_BROKEN
        lines = result.stderr.splitlines()
        assert lines[0] == "chain broken: 2 problems in workspace 'default'"
        assert lines[1].startswith("  version 2: signature does not match")
        assert lines[2].startswith("  version 3: parent link broken")

    def test_dropped_row_exits_one(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """A deleted version is reported as missing."""
        storage["list://db"] = [chain[0], *chain[2:]]
        result = run_verify("--storage", "list://db", "--public-key", str(public_key))
        assert result.exit_code == EXIT_BROKEN
        assert "version 3: version 2 is missing before it" in result.stderr

    def test_pages_through_long_histories(
        self,
        storage: dict[str, list[ConfigVersion]],
        signer: SigningKey,
        public_key: Path,
        run_verify: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Histories longer than one page are read completely with `before=`."""
        monkeypatch.setattr(versions_cmd, "PAGE_SIZE", 2)
        storage["list://db"] = build_chain(signer, [make_state(1)] * 5)
        result = run_verify("--storage", "list://db", "--public-key", str(public_key))
        assert result.exit_code == 0, result.output
        assert "intact: 5 versions" in result.stdout
        assert [c for c in ListStorage.calls if c[0] == "list"] == [
            ("list", None),
            ("list", 4),
            ("list", 2),
        ]

    def test_only_the_chosen_workspace_is_read(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        signer: SigningKey,
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """--workspace picks the history to verify."""
        blue = build_chain(signer, [make_state(1, workspace="blue")] * 2)
        storage["list://db"] = [*chain, *blue]
        result = run_verify(
            "--storage", "list://db", "--workspace", "blue", "--public-key", str(public_key)
        )
        assert result.exit_code == 0, result.output
        assert "intact: 2 versions in workspace 'blue'" in result.stdout

    def test_empty_workspace_is_fine(
        self,
        storage: dict[str, list[ConfigVersion]],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """A workspace without versions has nothing to break (the line asks whether it
        is the one meant: a mistyped -w finds no versions too)."""
        result = run_verify("--storage", "list://db", "--public-key", str(public_key))
        assert result.exit_code == 0
        assert (
            result.stdout == "no versions in workspace 'default' (is that the workspace meant?)\n"
        )
        short = run_verify("--storage", "list://db", "--public-key", str(public_key), "-w", "x")
        assert short.stdout.startswith("no versions in workspace 'x'")

    def test_json_output(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """--json prints one object with the verdict and every problem."""
        storage["list://db"] = [chain[0], *chain[2:]]
        result = run_verify("--storage", "list://db", "--public-key", str(public_key), "--json")
        assert result.exit_code == EXIT_BROKEN
        data = json.loads(result.stdout)
        assert data["intact"] is False
        assert data["versions"] == 3
        assert data["problems"] == [
            {"path": "version 3", "message": "version 2 is missing before it"}
        ]

    def test_another_masters_key_fails(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        tmp_path: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """Verifying against the wrong public key exits 1."""
        storage["list://db"] = list(chain)
        other = tmp_path / "other.pub"
        other.write_text(SigningKey.generate().public_key_pem())
        result = run_verify("--storage", "list://db", "--public-key", str(other))
        assert result.exit_code == EXIT_BROKEN
        assert "signed by key" in result.stderr

    def test_public_key_defaults_to_the_state_dir(
        self,
        storage: dict[str, list[ConfigVersion]],
        chain: list[ConfigVersion],
        signer: SigningKey,
        tmp_path: Path,
        run_verify: Callable[..., Any],
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Without --public-key, <state_dir>/signing.pub from the settings is used."""
        monkeypatch.delenv("NXMESH_STATE_DIR", raising=False)
        state_dir = tmp_path / "state"
        state_dir.mkdir()
        (state_dir / "signing.pub").write_text(signer.public_key_pem())
        config = tmp_path / "nxmesh.toml"
        config.write_text(f'state_dir = "{state_dir}"\nworkspace = "default"\n')
        storage["list://db"] = list(chain)
        result = run_verify("--storage", "list://db", config=config)
        assert result.exit_code == 0, result.output
        # The settings were read, so the backend got them (its plugin's section too),
        # for the URL given on the command line.
        assert ("from_settings", "list://db") in ListStorage.calls

    def test_missing_public_key_is_an_error_with_a_hint(
        self,
        storage: dict[str, list[ConfigVersion]],
        tmp_path: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """A missing public key file exits 2 and says how to provide one."""
        result = run_verify("--storage", "list://db", "--public-key", str(tmp_path / "nope.pub"))
        assert result.exit_code == EXIT_ERROR
        assert "pass --public-key FILE" in result.stderr

    def test_unknown_scheme_is_an_error(
        self,
        storage: dict[str, list[ConfigVersion]],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """A URL no storage plugin handles exits 2 listing the known schemes."""
        result = run_verify("--storage", "nope://x", "--public-key", str(public_key))
        assert result.exit_code == EXIT_ERROR
        assert "no storage provider handles URL scheme 'nope'" in result.stderr

    def test_storage_failure_is_reported_and_storage_closed(
        self,
        storage: dict[str, list[ConfigVersion]],
        public_key: Path,
        run_verify: Callable[..., Any],
    ) -> None:
        """A backend error exits 2 with its message, and the backend is still closed."""
        result = run_verify(
            "--storage", "list://user:hunter2@db/broken", "--public-key", str(public_key)
        )
        assert result.exit_code == EXIT_ERROR
        assert "disk on fire" in result.stderr
        assert "hunter2" not in result.stderr
        assert ListStorage.calls[-1] == ("aclose", "list://user:hunter2@db/broken")

    def test_registered_on_the_root_command(self) -> None:
        """`nxmesh versions verify` is reachable from the root command."""
        result = CliRunner().invoke(build_cli([]), ["versions", "verify", "--help"])
        assert result.exit_code == 0
        assert "--public-key" in result.stdout


class TestVerifyOnSqlite:
    """The command against the real built-in SQLite backend, tampered with by plain SQL."""

    @pytest.fixture
    def sqlite_cli(
        self,
        make_plugin_manager: Callable[..., NxMeshPluginManager],
        tmp_path: Path,
        chain: list[ConfigVersion],
    ) -> tuple[Path, Callable[..., Any]]:
        storage_sqlite = require_module("nxmesh.plugins.storage_sqlite")
        pm = make_plugin_manager()
        if "sqlite" not in ProviderRegistries.collect(pm)["storage"].names():
            pm.register(storage_sqlite, name="storage_sqlite")  # until it is an entry point
        db = tmp_path / "master.db"
        url = f"sqlite:///{db}"

        async def store() -> None:
            backend = storage_sqlite.SqliteStorage(url)
            await backend.open()
            try:
                for version in chain:
                    await backend.add_version(version)
            finally:
                await backend.aclose()

        anyio.run(store)

        def run(*args: str) -> Any:
            return CliRunner().invoke(
                versions_group,
                ["verify", "--storage", url, *args],
                obj=CliContext(pm=pm, config_path=None),
            )

        return db, run

    def sql(self, db: Path, statement: str, *params: object) -> None:
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute(statement, params)

    def test_untouched_database_is_intact(
        self, sqlite_cli: tuple[Path, Callable[..., Any]], public_key: Path
    ) -> None:
        """Versions written by the backend verify after a round trip through SQLite."""
        _, run = sqlite_cli
        result = run("--public-key", str(public_key))
        assert result.exit_code == 0, result.output
        assert "intact: 4 versions" in result.stdout

    def test_edited_message_row_is_named(
        self, sqlite_cli: tuple[Path, Callable[..., Any]], public_key: Path
    ) -> None:
        """An UPDATE of one version's message is reported against that version."""
        db, run = sqlite_cli
        self.sql(db, "UPDATE config_versions SET message = ? WHERE number = 2", "innocent")
        result = run("--public-key", str(public_key))
        assert result.exit_code == EXIT_BROKEN
        assert "version 2: signature does not match" in result.stderr
        assert "version 3: parent link broken" in result.stderr

    def test_edited_state_row_is_named(
        self, sqlite_cli: tuple[Path, Callable[..., Any]], public_key: Path
    ) -> None:
        """Rewriting a stored state body is reported as an edited state of its version."""
        db, run = sqlite_cli
        self.sql(
            db,
            "UPDATE config_states SET body = replace(body, '127.0.0.1:8081', '10.6.6.6:8081') "
            "WHERE sha256 = (SELECT state_sha256 FROM config_versions WHERE number = 2)",
        )
        result = run("--public-key", str(public_key))
        assert result.exit_code == EXIT_BROKEN
        assert "version 2: state was edited" in result.stderr

    def test_deleted_row_is_reported(
        self, sqlite_cli: tuple[Path, Callable[..., Any]], public_key: Path
    ) -> None:
        """A deleted version row shows up as a gap."""
        db, run = sqlite_cli
        self.sql(db, "DELETE FROM config_versions WHERE number = 3")
        result = run("--public-key", str(public_key))
        assert result.exit_code == EXIT_BROKEN
        assert "version 4: version 3 is missing before it" in result.stderr


class TestVerifyMissingDatabase:
    def test_a_mistyped_sqlite_path_is_an_error_not_an_empty_chain(self, tmp_path: Path) -> None:
        """verify refuses a database file that does not exist instead of creating it."""
        from click.testing import CliRunner

        from nxmesh.cli import build_cli
        from nxmesh.crypto.signing import SigningKey

        key_file = tmp_path / "signing.pub"
        key_file.write_text(SigningKey.generate().public_key_pem())
        missing = tmp_path / "typo.db"
        result = CliRunner().invoke(
            build_cli([]),
            [
                "versions",
                "verify",
                "--storage",
                f"sqlite:///{missing}",
                "--public-key",
                str(key_file),
            ],
        )
        assert result.exit_code == 2, result.output
        assert "no database at" in result.output
        assert not missing.exists()
