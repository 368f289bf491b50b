"""Build-time glue between surgery's docstrings and the API page (docs/api.md).

The docstrings are written for ``help()`` and IDEs: an ``Example:`` section of doctest lines
and Sphinx roles (:func:`load_partial`). Two small adapters make them read well on the site:

* ``ExampleSections`` (a Griffe extension, loaded by mkdocstrings) reads ``Example:`` as the
  Google style's ``Examples:`` section, so ``>>>`` lines render as code, not as quotes.
* ``on_page_content`` (a MkDocs hook) drops the role and, where the page holds the object's
  anchor (``surgery.load_partial``), links the name to it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

EXAMPLE = re.compile(r"^Example:$", re.M)
ROLE = re.compile(r":(?:func|class|meth|attr|mod|exc|data|obj):<code>~?([\w.]+)</code>")


class ExampleSections(griffe.Extension):
    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = EXAMPLE.sub("Examples:", obj.docstring.value)


def on_page_content(html: str, **kwargs: Any) -> str:
    anchors = set(re.findall(r'id="(surgery\.[\w.]+)"', html))

    def link(m: re.Match[str]) -> str:
        name = m.group(1)
        target = "surgery." + name.removeprefix("surgery.")
        if target in anchors:
            return f'<a href="#{target}"><code>{name.removeprefix("surgery.")}</code></a>'
        return f"<code>{name}</code>"

    return ROLE.sub(link, html)
