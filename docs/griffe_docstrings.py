"""Griffe extension: the docstrings' house habits, read as the site needs them.

The docstrings are Google style (``Args:``, ``Returns:``, ``Example:``) and use forms that
griffe's Google parser or Markdown read otherwise:

* an ``Example:`` section is read as ``Examples:``, griffe's examples section, so its
  ``>>>`` lines render as highlighted ``pycon`` code blocks (griffe reads ``Example:`` as
  an admonition, whose ``>>>`` lines Markdown renders as nested blockquotes of prose);
* roles such as :func:`layer_norm` or :class:`eqx_norm.GroupNorm` become inline code, and
  a link when the name is an object the site documents (a ``::: identifier`` of a page in
  docs/, or a member of one);
* ``.. math::`` blocks become ``$$`` blocks, which pymdownx.arithmatex marks and
  docs/hooks.py draws as MathML.
"""

from __future__ import annotations

import re
from pathlib import Path

import griffe

_ROLE = re.compile(r":(?:func|class|meth|mod|attr|obj|data|exc):`~?([\w.]+)`")
_MATH = re.compile(r"^(?P<indent> *)\.\. math::[ \t]*(?P<first>.*)$")
_EXAMPLE = re.compile(r"^(?P<indent> *)Example:[ \t]*$", re.MULTILINE)
# the objects the site documents: the `::: identifier` lines of its pages
DOCUMENTED = tuple(
    sorted(
        {
            match[1]
            for page in Path(__file__).parent.rglob("*.md")
            for match in re.finditer(r"^::: *([\w.]+)", page.read_text(), re.MULTILINE)
        }
    )
)


def _documented(path: str) -> bool:
    return any(path == root or path.startswith(root + ".") for root in DOCUMENTED)


def _public_path(obj: griffe.Object, target: str) -> str | None:
    """The path of ``target`` as a public eqx_norm object the site documents, if it is one."""
    root = obj.package
    for path in (target, f"{obj.module.path}.{target}", f"{root.path}.{target}"):
        head, _, rest = path.partition(".")
        if head != root.name or any(part.startswith("_") for part in path.split(".")):
            continue
        try:
            target_obj = root[rest] if rest else root
            canonical = target_obj.canonical_path
        except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        if _documented(path) or _documented(canonical):
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

                text = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)
                obj.docstring.value = _ROLE.sub(role, _math_blocks(text))
            stack += [m for m in obj.members.values() if not m.is_alias]
