"""The built-in nginx renderer plugin: desired state → a deterministic bundle of nginx files.

Registered through the ``nxmesh`` entry point ``render_nginx``; ``trylast`` so a
third-party renderer registered under another name is listed first. See
``docs/rendering.md`` for the bundle layout, the quoting rules and the template override
points.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from nxmesh import hookimpl
from nxmesh.plugins.render_nginx.quoting import Token, UnsafeValueError
from nxmesh.plugins.render_nginx.renderer import (
    BUILTIN_TEMPLATES,
    ERROR_PAGES_DIR,
    PROXY_CACHE_FILE,
    STATUS_FILE,
    SYSTEM_CA_FILE,
    TEMPLATE_NAMES,
    UPSTREAM_CA_DIR,
    CertificatePaths,
    ErrorPageView,
    HeaderLine,
    LocationView,
    NginxRenderer,
    RenderError,
    RenderSettings,
    SiteView,
    TemplateRenderError,
    certificate_paths,
    config_digest,
    error_page_files,
    named_certificate_paths,
    plugin_template_paths,
    renderer_for,
    site_view,
    upstream_ca_files,
)

if TYPE_CHECKING:
    from nxmesh.core.interfaces import Renderer

__all__ = [
    "BUILTIN_TEMPLATES",
    "ERROR_PAGES_DIR",
    "PROXY_CACHE_FILE",
    "STATUS_FILE",
    "SYSTEM_CA_FILE",
    "TEMPLATE_NAMES",
    "UPSTREAM_CA_DIR",
    "CertificatePaths",
    "ErrorPageView",
    "HeaderLine",
    "LocationView",
    "NginxRenderer",
    "RenderError",
    "RenderSettings",
    "SiteView",
    "TemplateRenderError",
    "Token",
    "UnsafeValueError",
    "certificate_paths",
    "config_digest",
    "error_page_files",
    "named_certificate_paths",
    "nxmesh_register_renderers",
    "plugin_template_paths",
    "renderer_for",
    "site_view",
    "upstream_ca_files",
]


@hookimpl(trylast=True)
def nxmesh_register_renderers() -> Sequence[type[Renderer]]:
    return [NginxRenderer]
