"""The converter: strict structuring, complete error paths, plain unstructuring, canonical JSON."""

from __future__ import annotations

import hashlib
import json
import math
from functools import partial
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nxmesh.core.errors import ValidationError
from nxmesh.core.model import (
    Agent,
    ApplyReport,
    CertificateRef,
    ConfigVersion,
    DesiredState,
    FrozenMap,
    Header,
    HealthReport,
    HealthResult,
    Listener,
    Location,
    Redirect,
    Return,
    Site,
    TLSConfig,
    Upstream,
    UpstreamServer,
    check_state,
)
from nxmesh.core.serialization import (
    canonical_json,
    state_digest,
    structure,
    structure_state,
    unstructure,
)
from nxmesh.core.validation import UPSTREAM_ADDRESS, upstream_address_hazard


def problems(data: object, cl: type[Any] = DesiredState) -> dict[str, str]:
    build = structure_state if cl is DesiredState else partial(structure, cl=cl)
    with pytest.raises(ValidationError) as info:
        build(data, source="test.yaml")
    assert info.value.source == "test.yaml"
    return {p.path: p.message for p in info.value.problems}


def site(**fields: Any) -> dict[str, Any]:
    return {
        "name": "web",
        "server_names": ["example.com"],
        "locations": [{"path": "/", "return": {"code": 204}}],
        **fields,
    }


# ---------------------------------------------------------------------------------------
# Hypothesis strategies for valid states
# ---------------------------------------------------------------------------------------

names = st.from_regex(r"[a-z][a-z0-9_-]{0,12}", fullmatch=True)
dns_labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
tlds = st.from_regex(r"[a-z]{2,6}", fullmatch=True)
hostnames = st.builds(
    lambda labels, tld: ".".join([*labels, tld]), st.lists(dns_labels, min_size=1, max_size=3), tlds
)
safe_text = st.from_regex(r"[ !%-:<-\[\]-z|~]{1,40}", fullmatch=True)
headers = st.builds(
    Header,
    name=st.from_regex(r"[A-Za-z0-9][A-Za-z0-9-]{0,20}", fullmatch=True),
    value=safe_text,
    always=st.booleans(),
)
uri_paths = st.from_regex(r"/[A-Za-z0-9._~!*()@:+,=/-]{0,30}", fullmatch=True)
roots = st.from_regex(r"/(srv|var/www|opt/site)(/[a-z0-9_-]{1,8}){0,3}", fullmatch=True)
sizes = st.from_regex(r"[0-9]{1,4}[kmg]?", fullmatch=True)
addresses = st.one_of(
    st.builds("{}:{}".format, hostnames, st.integers(1, 65535)),
    st.builds("{}.{}.{}.{}:{}".format, *[st.integers(0, 255)] * 4, st.integers(1, 65535)),
    st.from_regex(r"unix:/run/[a-z]{1,8}\.sock", fullmatch=True),
).filter(  # e.g. no metadata IPs, no :2375
    lambda a: UPSTREAM_ADDRESS.reason(a) is None and upstream_address_hazard(a) is None
)


@st.composite
def upstreams(draw: st.DrawFn, name: str) -> Upstream:
    method = draw(st.sampled_from(["round_robin", "least_conn", "ip_hash", "random"]))
    servers = draw(
        st.lists(
            st.builds(
                UpstreamServer,
                address=addresses,
                weight=st.integers(1, 1000),
                max_fails=st.integers(0, 1000),
                fail_timeout=st.integers(0, 86400),
            ),
            min_size=1,
            max_size=4,
        )
    )
    return Upstream(name, tuple(servers), method, draw(st.integers(0, 10000)))  # type: ignore[arg-type]


@st.composite
def locations(draw: st.DrawFn, upstream_names: list[str]) -> Location:
    match = draw(st.sampled_from(["prefix", "exact", "regex", "regex_ci"]))
    if match in ("prefix", "exact"):
        path = draw(uri_paths)
    else:
        path = draw(st.sampled_from(["^/api/", "\\.php$", "^/(a|b)/[0-9]+$", "^/x/.*\\.js"]))
    kinds = ["root", "redirect", "return"] + (["upstream"] * bool(upstream_names))
    kind = draw(st.sampled_from(kinds))
    fields: dict[str, Any] = {
        "path": path,
        "match": match,
        "headers": tuple(draw(st.lists(headers, max_size=2))),
        "client_max_body_size": draw(st.none() | sizes),
    }
    if kind == "upstream":
        fields["upstream"] = draw(st.sampled_from(upstream_names))
        fields["websocket"] = draw(st.booleans())
        fields["proxy_headers"] = tuple(draw(st.lists(headers, max_size=2)))
        fields["proxy_read_timeout"] = draw(st.none() | st.integers(1, 86400))
    elif kind == "root":
        fields["root"] = draw(roots)
        fields["index"] = tuple(
            draw(st.lists(st.sampled_from(["index.html", "a.htm"]), unique=True))
        )
    elif kind == "redirect":
        url = draw(st.sampled_from(["https://example.com", "/new", "http://[::1]:8080/a?b=c"]))
        suffix = draw(st.sampled_from(["", "$request_uri"]))
        fields["redirect"] = Redirect(draw(st.sampled_from([301, 302, 307, 308])), url + suffix)
    else:
        fields["return_"] = Return(draw(st.sampled_from([200, 204, 404, 503])), draw(safe_text))
    return Location(**fields)


@st.composite
def states(draw: st.DrawFn) -> DesiredState:
    upstream_names = draw(st.lists(names, unique=True, max_size=3))
    cert_names = draw(st.lists(names, unique=True, max_size=2))
    site_names = draw(st.lists(names, unique=True, max_size=3))
    n_hosts = 2 * len(site_names)
    all_hosts = draw(st.lists(hostnames, unique=True, min_size=n_hosts, max_size=n_hosts))
    # One list for every TLS site: they share port 443, where nginx needs one.
    protocols = draw(st.sampled_from([("TLSv1.3",), ("TLSv1.2", "TLSv1.3")]))
    sites = []
    for i, name in enumerate(site_names):
        tls_mode = draw(st.sampled_from(["none", "acme"] + ["cert"] * bool(cert_names)))
        tls = None
        listeners: tuple[Listener, ...] = (Listener(),)
        if tls_mode != "none":
            cert = draw(st.sampled_from(cert_names)) if tls_mode == "cert" else None
            tls = TLSConfig(
                certificate=cert,
                acme=cert is None,
                redirect_http=draw(st.booleans()),
                hsts=draw(st.booleans()),
                protocols=protocols,
            )
            listeners = (Listener(443, tls=True, http2=draw(st.booleans())), Listener(80))
        locs = draw(
            st.lists(
                locations(upstream_names),
                min_size=1,
                max_size=4,
                unique_by=lambda loc: (loc.match, loc.path),
            )
        )
        sites.append(
            Site(
                name=name,
                server_names=tuple(all_hosts[2 * i : 2 * i + 2]),
                listeners=listeners,
                locations=tuple(locs),
                tls=tls,
                headers=tuple(draw(st.lists(headers, max_size=2))),
                access_log=draw(st.booleans()),
                client_max_body_size=draw(sizes),
            )
        )
    state = DesiredState(
        sites=tuple(sites),
        upstreams=tuple(draw(upstreams(n)) for n in upstream_names),
        certificates=tuple(
            CertificateRef(n, (draw(hostnames),), draw(st.sampled_from(["upload", "acme"])))
            for n in cert_names
        ),
        workspace=draw(names),
    )
    assert check_state(state) == []
    return state


class TestRoundTrip:
    @settings(max_examples=150, deadline=None)
    @given(states())
    def test_structure_inverts_unstructure(self, state: DesiredState) -> None:
        """structure(unstructure(x)) == x for generated valid states."""
        assert structure_state(unstructure(state)) == state

    @settings(max_examples=50, deadline=None)
    @given(states())
    def test_canonical_json_survives_a_round_trip(self, state: DesiredState) -> None:
        """Canonical JSON parsed and structured again gives the same bytes and digest."""
        again = structure_state(json.loads(canonical_json(state)))
        assert canonical_json(again) == canonical_json(state)
        assert state_digest(again) == state_digest(state)

    def test_fleet_objects_round_trip(self) -> None:
        """Agents, versions and reports round-trip, mappings included."""
        objects: list[Any] = [
            Agent(id="a1", name="edge-1", labels={"env": "prod"}, status="online", last_seen=1.5),
            ConfigVersion(
                workspace="default",
                number=3,
                digest="ab" * 32,
                parent_digest=None,
                author="alice",
                message="add site\n\nbecause",
                created_at=1700000000.25,
                state=DesiredState(),
                signature="c2ln",
                key_id="master-1",
            ),
            ApplyReport(
                agent_id="a1",
                version=3,
                digest="ab" * 32,
                outcome="applied",
                durations={"render": 0.01, "reload": 0.2},
            ),
            HealthReport("a1", 12.0, (HealthResult("nginx", "warn", "slow", {"rtt": 0.3}),)),
        ]
        for obj in objects:
            assert structure(unstructure(obj), type(obj)) == obj


class TestUnstructure:
    def test_plain_types_only(self) -> None:
        """Unstructured data is made of dicts, lists and scalars, ready for YAML or JSON."""
        agent = Agent(id="a1", name="n", labels={"env": "prod"})
        data = unstructure(agent)
        assert type(data["labels"]) is dict
        report = HealthReport("a1", 1.0, (HealthResult("c", "ok"),))
        assert type(unstructure(report)["results"]) is list

    def test_return_is_spelled_return(self) -> None:
        """Location.return_ appears under the YAML key 'return'."""
        loc = Location(path="/", return_=Return(404, "nope"))
        data = unstructure(loc)
        assert data["return"] == {"code": 404, "body": "nope"}
        assert "return_" not in data

    def test_mappings_structure_frozen(self) -> None:
        """Mappings come back as hashable FrozenMaps equal to the input dict."""
        agent = structure({"id": "a1", "name": "n", "labels": {"env": "prod"}}, Agent)
        assert isinstance(agent.labels, FrozenMap)
        assert agent.labels == {"env": "prod"}
        assert hash(agent) == hash(Agent(id="a1", name="n", labels={"env": "prod"}))


class TestCanonicalJson:
    def test_sorted_compact_utf8(self) -> None:
        """Keys are sorted, there is no whitespace, and non-ASCII stays UTF-8."""
        version = ConfigVersion(
            workspace="default",
            number=1,
            digest="d",
            parent_digest=None,
            author="Zoë",
            message="",
            created_at=0.0,
            state=DesiredState(),
        )
        raw = canonical_json(version)
        assert raw.startswith(b'{"author":"Zo\xc3\xab","created_at":0.0,"digest":"d",')
        assert b" " not in raw
        assert b"\n" not in raw
        assert list(json.loads(raw)) == sorted(json.loads(raw))

    def test_independent_of_mapping_order(self) -> None:
        """Two equal mappings built in different orders serialise identically."""
        a = Agent(id="a", name="n", labels={"x": "1", "y": "2"})
        b = Agent(id="a", name="n", labels={"y": "2", "x": "1"})
        assert canonical_json(a) == canonical_json(b)

    def test_digest_is_sha256_of_canonical_json(self) -> None:
        """state_digest is the hex sha256 of the canonical JSON."""
        state = structure_state({"sites": [site()]})
        assert state_digest(state) == hashlib.sha256(canonical_json(state)).hexdigest()

    def test_an_added_field_at_its_default_keeps_earlier_digests(self) -> None:
        """A field marked `ADDED_FIELD` (``serve_dotfiles``) is absent from the canonical
        JSON at its default: a state stored before it existed reads back to the same
        digest, so its signed versions still verify. Set, it counts like any field."""
        earlier = {"path": "/", "root": "/srv/www"}
        location = structure(earlier, Location)
        assert location.serve_dotfiles is False
        assert "serve_dotfiles" not in unstructure(location)
        a = structure_state({"sites": [site(locations=[earlier])]})
        assert b"serve_dotfiles" not in canonical_json(a)
        b = structure_state({"sites": [site(locations=[{**earlier, "serve_dotfiles": True}])]})
        assert unstructure(b.sites[0].locations[0])["serve_dotfiles"] is True
        assert state_digest(a) != state_digest(b)
        assert structure_state(unstructure(b)) == b

    def test_added_fields_have_defaults(self) -> None:
        """Only a field with a default can be left out (and read back) this way."""
        for cl in (Location, Site, Listener, Upstream, UpstreamServer, TLSConfig, DesiredState):
            for a in attrs.fields(cl):
                if a.metadata.get("omit_default"):
                    assert a.default is not attrs.NOTHING, f"{cl.__name__}.{a.name}"

    def test_digest_changes_with_content(self) -> None:
        """Changing one field changes the digest."""
        a = structure_state({"sites": [site()]})
        b = structure_state({"sites": [site(access_log=False)]})
        assert state_digest(a) != state_digest(b)

    @settings(max_examples=300)
    @given(
        st.recursive(
            st.none()
            | st.booleans()
            | st.integers()
            | st.floats(allow_nan=False, allow_infinity=False)
            | st.text(),
            lambda children: (
                st.lists(children, max_size=4)
                | st.dictionaries(st.text(max_size=8), children, max_size=4)
            ),
            max_leaves=20,
        )
    )
    def test_same_bytes_as_the_standard_encoder(self, data: Any) -> None:
        """The encoder built once writes what `json.dumps` with the canonical options
        writes, for any JSON data (escapes, nesting, floats, key order)."""
        expected = json.dumps(
            data, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode()
        assert canonical_json(data) == expected

    def test_non_finite_float_is_refused(self) -> None:
        """NaN cannot be canonical; the model refuses it before it can be hashed."""
        with pytest.raises(ValueError, match="finite"):
            HealthResult("c", "ok", metrics={"x": math.nan})
        with pytest.raises(ValueError, match="JSON compliant"):
            canonical_json({"x": math.inf})


class TestStrictness:
    def test_number_is_not_a_string(self) -> None:
        """A number where a string belongs is an error, not silently converted."""
        assert problems({"sites": [site(name=5)]}) == {
            "sites[0].name": "must be a string, got an integer (5); put the value in quotes "
            "to keep it as written"
        }

    def test_string_is_not_a_list(self) -> None:
        """A single string where a list belongs is an error, not a list of characters."""
        assert (
            "must be a list"
            in problems({"sites": [site(server_names="example.com")]})["sites[0].server_names"]
        )

    def test_yes_is_not_a_boolean(self) -> None:
        """Only true/false are booleans; 'yes' as a string is rejected."""
        assert (
            "true or false" in problems({"sites": [site(access_log="yes")]})["sites[0].access_log"]
        )

    def test_boolean_is_not_an_integer(self) -> None:
        """true is not a port number."""
        data = {"sites": [site(listeners=[{"port": True}])]}
        assert "integer" in problems(data)["sites[0].listeners[0].port"]

    def test_non_mapping_object(self) -> None:
        """A list where an object belongs is reported at that object's path."""
        assert "mapping" in problems({"sites": [["web"]]})["sites[0]"]

    def test_top_level_must_be_mapping(self) -> None:
        """The document itself must be a mapping."""
        assert "mapping" in problems(["sites"])[""]

    def test_literal_choices_are_listed(self) -> None:
        """A bad enum value lists the valid choices."""
        data = {"sites": [site(locations=[{"path": "/", "match": "glob", "root": "/srv"}])]}
        message = problems(data)["sites[0].locations[0].match"]
        assert "'prefix', 'prefix_priority', 'exact', 'regex', 'regex_ci'" in message

    def test_required_field_missing(self) -> None:
        """A missing required field is reported at its path."""
        data = {"sites": [{"name": "web", "locations": [{"path": "/", "root": "/srv"}]}]}
        assert problems(data) == {"sites[0].server_names": "is required"}


class TestErrorPaths:
    def test_all_problems_are_collected(self) -> None:
        """Problems in different objects and fields are all reported in one error."""
        data = {
            "sites": [
                site(name="Web", server_names=["bad name"]),
                site(name="two", listeners=[{"port": 0}], client_max_body_size="1 m"),
            ],
            "upstreams": [{"name": "app", "servers": [{"address": "app"}]}],
        }
        assert set(problems(data)) == {
            "sites[0].name",
            "sites[0].server_names[0]",
            "sites[1].listeners[0].port",
            "sites[1].client_max_body_size",
            "upstreams[0].servers[0].address",
        }

    def test_object_rule_points_at_the_object(self) -> None:
        """A location with two actions is reported at the location itself."""
        data = {"sites": [site(locations=[{"path": "/", "root": "/srv", "return": {"code": 204}}])]}
        assert "exactly one" in problems(data)["sites[0].locations[0]"]

    def test_return_key_in_path(self) -> None:
        """Paths use the YAML spelling 'return', not the attribute name."""
        data = {"sites": [site(locations=[{"path": "/", "return": {"code": 302}}])]}
        assert "sites[0].locations[0].return.code" in problems(data)

    def test_unknown_key_suggests_the_close_one(self) -> None:
        """A misspelt key is an error that suggests the intended field."""
        data = {"sites": [{**site(), "sever_names": ["a.com"]}]}
        assert problems(data)["sites[0].sever_names"] == (
            "unknown field 'sever_names'; did you mean 'server_names'?"
        )

    def test_unknown_odd_key_is_bracketed(self) -> None:
        """A key that is not an identifier appears in brackets in the path."""
        data = {"sites": [{**site(), "no such": 1}]}
        assert "sites[0]['no such']" in problems(data)

    def test_cross_references_are_checked(self) -> None:
        """structure_state also runs check_state and reports dangling references."""
        data = {"sites": [site(locations=[{"path": "/", "upstream": "api"}])]}
        message = "refers to upstream 'api', but no upstreams are defined"
        assert problems(data) == {"sites[0].locations[0].upstream": message}

    def test_label_path_uses_key(self) -> None:
        """A bad mapping value is reported under its key."""
        data = {"id": "a1", "name": "n", "labels": {"env": 3}}
        assert problems(data, Agent) == {
            "labels['env']": "must be a string, got an integer (3); put the value in quotes "
            "to keep it as written"
        }


class TestTLSShorthand:
    def test_acme_string(self) -> None:
        """'tls: acme' means TLSConfig(acme=True)."""
        data = {"sites": [site(listeners=[{"port": 443, "tls": True}], tls="acme")]}
        assert structure_state(data).sites[0].tls == TLSConfig(acme=True)

    def test_other_string_is_rejected(self) -> None:
        """Any other string is an error at the tls field explaining the shorthand."""
        data = {"sites": [site(listeners=[{"port": 443, "tls": True}], tls="letsencrypt")]}
        assert "only shorthand is 'acme'" in problems(data)["sites[0].tls"]

    def test_mapping_form_is_validated(self) -> None:
        """The mapping form still needs exactly one of certificate or acme."""
        data = {
            "sites": [site(listeners=[{"port": 443, "tls": True}], tls={"hsts": True})],
        }
        assert "exactly one" in problems(data)["sites[0].tls"]
