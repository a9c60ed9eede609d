"""Generate docs/hooks.md from the hook spec docstrings (the docstrings are the reference).

    python docs/gen_hooks.py           # rewrite docs/hooks.md
    python docs/gen_hooks.py --check   # exit 1 when docs/hooks.md is stale
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

from nxmesh.core import hookspecs

OUT = Path(__file__).with_name("hooks.md")
SECTION_MARK = "# " + "-" * 20


def _sections() -> list[tuple[str, list[str]]]:
    """(section title, hook names) in source order, read from the banner comments."""
    source = inspect.getsource(hookspecs).splitlines()
    sections: list[tuple[str, list[str]]] = []
    for i, line in enumerate(source):
        if line.startswith(SECTION_MARK) and i + 2 < len(source) and source[i + 2].startswith(SECTION_MARK):
            sections.append((source[i + 1].lstrip("# ").strip(), []))
        elif line.startswith("def nxmesh_") and sections:
            sections[-1][1].append(line[4:].split("(", 1)[0])
    return sections


def render() -> str:
    out = [
        "# Hook reference",
        "",
        "Generated from `src/nxmesh/core/hookspecs.py` by `docs/gen_hooks.py`; edit the",
        "docstrings, not this file. Implement a hook with `from nxmesh import hookimpl`.",
        "",
    ]
    for title, names in _sections():
        out += [f"# {title}", ""]
        for name in names:
            func = getattr(hookspecs, name)
            opts = getattr(func, "nxmesh_spec", {}) or {}
            flags = [k for k in ("historic", "firstresult") if opts.get(k)]
            sig = str(inspect.signature(func)).replace("'", "")
            out += [f"## `{name}{sig}`", ""]
            if flags:
                out += [f"*{', '.join(flags)}*", ""]
            out += [inspect.getdoc(func) or "", ""]
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python docs/gen_hooks.py")
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
