"""The model's listener, location and regex rules agree with a real ``nginx -t``.

`check_state` is meant to refuse what nginx would refuse, with a message a user can act
on, before anything reaches an agent. These tests render states the cross-object checks
are about (a `DesiredState` is built without them) and let nginx judge the same input.
"""

from __future__ import annotations

import pytest

from nxmesh.core.bundle import Bundle
from nxmesh.core.errors import ValidationError
from nxmesh.core.model import (
    CertificateRef,
    DesiredState,
    Listener,
    Location,
    Return,
    Site,
    TLSConfig,
    check_state,
)
from nxmesh.core.serialization import structure_state
from nxmesh.core.validation import POSIX_CLASSES, REGEX_PATH
from nxmesh.nginx_check import NginxCheckResult, check_bundle
from nxmesh.plugins.render_nginx import NginxRenderer
from nxmesh.testing.services import require_binary


def nginx_t(state: DesiredState) -> NginxCheckResult:
    require_binary("nginx")
    return check_bundle(NginxRenderer().render(state), placeholder_certificates=True)


def site(name: str, *listeners: Listener, **fields: object) -> Site:
    fields.setdefault("locations", (Location(path="/", return_=Return(204)),))
    return Site(
        name=name,
        server_names=(f"{name}.example.test",),
        listeners=listeners,
        **fields,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(("first", "second"), [(None, "0.0.0.0"), ("*", "0.0.0.0"), ("::", "0::0")])
def test_default_server_spellings_are_one_socket(first: str | None, second: str) -> None:
    """nginx: 'a duplicate default server'; the model names the later listener."""
    state = DesiredState(
        sites=(
            site("a", Listener(8080, address=first, default_server=True)),
            site("b", Listener(8080, address=second, default_server=True)),
        )
    )
    result = nginx_t(state)
    assert not result.ok
    assert "a duplicate default server" in result.output
    assert [p.path for p in check_state(state)] == ["sites[1].listeners[0].default_server"]


@pytest.mark.parametrize("source", ["tls: acme", "acme certificate"])
def test_acme_challenge_location_of_the_site_is_refused(source: str) -> None:
    """Without redirect_http the challenge location shares the server with the site's
    locations: nginx says 'duplicate location'; the model reserves the path."""
    if source == "tls: acme":
        tls, certificates = TLSConfig(acme=True, redirect_http=False), ()
    else:
        tls = TLSConfig(certificate="c", redirect_http=False)
        certificates = (CertificateRef("c", ("a.example.test",), source="acme"),)
    state = DesiredState(
        sites=(
            site(
                "a",
                Listener(8080),
                Listener(8443, tls=True),
                tls=tls,
                locations=(Location(path="/.well-known/acme-challenge/", return_=Return(204)),),
            ),
        ),
        certificates=certificates,
    )
    result = nginx_t(state)
    assert not result.ok
    assert 'duplicate location "/.well-known/acme-challenge/"' in result.output
    assert [p.path for p in check_state(state)] == ["sites[0].locations[0].path"]


def test_every_posix_class_the_model_accepts_passes_nginx() -> None:
    """The standard POSIX classes, plain and negated, pass the model and nginx -t."""
    regexes = [f"^/{n}/[[:{c}:]]+$" for n, c in enumerate(sorted(POSIX_CLASSES))]
    regexes += [f"^/not{n}/[[:^{c}:]]" for n, c in enumerate(sorted(POSIX_CLASSES))]
    regexes += ["^/mix/[-[:digit:][:alpha:]_]+$", "^/dot/[.]", "^/colon/[:/]+"]
    state = structure_state(
        {
            "sites": [
                {
                    "name": "a",
                    "server_names": ["a.example.test"],
                    "listeners": [{"port": 8080}],
                    "locations": [
                        {"path": r, "match": "regex", "return": {"code": 204}} for r in regexes
                    ],
                }
            ]
        }
    )
    result = nginx_t(state)
    assert result.ok, result.output


@pytest.mark.parametrize(
    ("regex", "nginx_says"),
    [
        ("^/[[:foo:]]", "unknown POSIX class name"),
        ("^/[[:ALPHA:]]", "unknown POSIX class name"),
        ("^/[[.a.]]", "POSIX collating elements are not supported"),
        ("^/[[=a=]]", "POSIX collating elements are not supported"),
        ("^/[.a.]", "POSIX collating elements are not supported"),
        ("^/[:alpha:]", "POSIX named classes are supported only within a class"),
        ("^/[[:alpha:]", "missing terminating ] for character class"),
        ("^/[[:digit:]-z]", "invalid range in character class"),
        ("^/[a-[:digit:]]", "invalid range in character class"),
    ],
)
def test_posix_forms_the_model_refuses_fail_nginx(regex: str, nginx_says: str) -> None:
    """Python's re accepts these; nginx's PCRE2 does not, and neither does the model."""
    assert REGEX_PATH.reason(regex) is not None
    with pytest.raises(ValidationError):
        structure_state(
            {
                "sites": [
                    {
                        "name": "a",
                        "server_names": ["a.example.test"],
                        "locations": [{"path": regex, "match": "regex", "return": {"code": 204}}],
                    }
                ]
            }
        )
    # The same regex written into an otherwise valid bundle, where the model is bypassed.
    require_binary("nginx")
    stand_in = "^/standin"
    bundle = NginxRenderer().render(
        DesiredState(
            sites=(
                site(
                    "a",
                    Listener(8080),
                    locations=(Location(path=stand_in, match="regex", return_=Return(204)),),
                ),
            )
        )
    )
    files = dict(bundle.files)
    conf = files["conf.d/site-a.conf"]
    assert conf.count(stand_in.encode()) == 1
    files["conf.d/site-a.conf"] = conf.replace(stand_in.encode(), regex.encode())
    result = check_bundle(Bundle(files))
    assert not result.ok
    assert nginx_says in result.output
