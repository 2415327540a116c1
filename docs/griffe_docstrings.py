"""Griffe extension: the docstrings' two reStructuredText habits, read as Markdown.

The docstrings are Google style (``Args:``, ``Returns:``, ``Example:``) and use two reST
forms that Markdown does not know:

* roles such as :func:`layer_norm` or :class:`eqx_norm.GroupNorm` become inline code, and
  a link when the name is a public object of eqx_norm (so it has a place on the site);
* ``.. math::`` blocks become ``$$`` blocks, which pymdownx.arithmatex marks and
  docs/hooks.py draws as MathML.
"""

from __future__ import annotations

import re

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc):`~?([\w.]+)`")
_MATH = re.compile(r"^(?P<indent> *)\.\. math::[ \t]*(?P<first>.*)$")


def _public_path(obj: griffe.Object, target: str) -> str | None:
    """The path of ``target`` as a public, documented eqx_norm object, if it is one."""
    root = obj.package
    for path in (target, f"{obj.module.path}.{target}", f"{root.path}.{target}"):
        head, _, rest = path.partition(".")
        if head != root.name or any(part.startswith("_") for part in path.split(".")):
            continue
        try:
            root[rest] if rest else root
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        return path
    return None


def _math_blocks(text: str) -> str:
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, body = match["indent"], [match["first"]] if match["first"] else []
        i += 1
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            if lines[i].strip():
                body.append(lines[i].strip())
            elif body:  # a blank line after the formula ends the block
                break
            i += 1
        out += [f"{indent}$$", *(indent + line for line in body), f"{indent}$$"]
    return "\n".join(out)


class ReSTToMarkdown(griffe.Extension):
    """Rewrite the docstrings of a package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, **kwargs) -> None:
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            if obj.docstring is not None:

                def role(match: re.Match, obj: griffe.Object = obj) -> str:
                    path = _public_path(obj, match[1])
                    return f"[`{match[1]}`][{path}]" if path else f"`{match[1]}`"

                obj.docstring.value = _ROLE.sub(role, _math_blocks(obj.docstring.value))
            stack += [m for m in obj.members.values() if not m.is_alias]
