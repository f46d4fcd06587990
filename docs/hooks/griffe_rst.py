"""Griffe extension: the reST constructs of fisherfx's docstrings, as Markdown for the site.

The docstrings are Google style with a few reST habits that read well in ``help()``: ``.. math::``
blocks and Sphinx roles (``:func:`x```, ``:class:`~a.b.C```). This extension rewrites them when
griffe loads a docstring, leaving the source untouched:

* a ``.. math::`` block (the indented lines under it) becomes a ``$$ … $$`` block, typeset by
  ``pymdownx.arithmatex`` and MathJax;
* a role becomes a code span of its target (``~`` keeps the last dotted component).

Double-backtick literals are already Markdown code spans and are left as they are.
"""

import re

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|mod|data|obj|exc|const):`(?P<tilde>~?)(?P<target>[^`]+)`")
_MATH = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")


def _role(match: re.Match) -> str:
    target = match.group("target").strip()
    if "<" in target and target.endswith(">"):  # :func:`title <target>`
        target = target.split("<", 1)[0].strip()
    elif match.group("tilde"):
        target = target.rsplit(".", 1)[-1]
    return f"`{target}`"


def _width(line: str) -> int:
    return len(line) - len(line.lstrip())


def rst_to_markdown(text: str) -> str:
    """``.. math::`` blocks to ``$$`` blocks and Sphinx roles to code spans."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH.match(lines[i])
        if not match:
            out.append(_ROLE.sub(_role, lines[i]))
            i += 1
            continue
        indent = match.group("indent")
        body = [match.group("inline")] if match.group("inline").strip() else []
        i += 1
        while i < len(lines) and (not lines[i].strip() or _width(lines[i]) > len(indent)):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        while body and not body[0]:
            body.pop(0)
        if out and out[-1].strip():
            out.append("")
        out += [f"{indent}$$"] + [f"{indent}{b}" for b in body if b] + [f"{indent}$$"]
        if i < len(lines) and lines[i].strip():
            out.append("")
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrites every loaded docstring with :func:`rst_to_markdown`."""

    def on_instance(self, *, node, obj, agent, **kwargs) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value)
