"""Match by structure: pair the tensors of two models whose key names differ entirely.

Converting weights between libraries (torchvision -> timm, torchvision -> transformers, an old
codebase -> its rewrite) usually needs a hand-written regex table per pair of architectures.
:func:`match` derives it: it runs each model once on an example input (on the ``meta`` device
when the model is there, so no weights are needed), records the order in which every module
first uses its own parameters and buffers, gives each module a signature (type family and the
multiset of its tensor shapes), aligns the two sequences with an edit-distance alignment and
pairs the tensors inside aligned modules. The result, a :class:`Match`, is data, a table, a
``remap`` dict for :func:`load_partial` and a few regex ``rules`` to paste into a script.

Modules: ``trace`` (each model as a sequence of entries), ``align`` (aligning them, pairing
tensors, fused layouts), ``rules`` (regex rules), ``result`` (:class:`Match`), ``match``.
"""

from __future__ import annotations

from .match import match, verify
from .result import Difference, Layout, Match, MatchedKey

__all__ = ["Difference", "Layout", "Match", "MatchedKey", "match", "verify"]
