"""Differential test: ``load_partial`` against plain torch on generated checkpoints (issue 19).

Each case is a small model (layers of few shapes, often the same; an embedding tied to an
LM head; int64 and float buffers; float32/float16/bfloat16 parameters) and one or more copies
of its weights with their own values: cast to another dtype, tied or untied, keys that view
one storage (slices of one tensor, a transposed view), a mismatched head, a missing key, an
extra tensor, a non-tensor ``"version"``, a DDP ``module.`` prefix. The copies sit flat, in a
training container in random key order (``model``, ``model_ema``, ``teacher``, ...; beside
``epoch`` and optimizer state, one level of nesting ``{"model": {"module": sd}}``), and are
written in one of the forms surgery reads: in memory, torch zip and legacy, pickle protocol 2
and 4, safetensors, a sharded index (``huggingface_hub.save_torch_state_dict``, safetensors
and ``.bin`` shards), a DCP folder.

For the default entry and every entry a user could name, the values ``load_partial`` puts in
the model must equal the oracle's: plain ``torch.load(weights_only=False)`` (for safetensors
``safetensors.torch.load_file``; a DCP folder through ``dcp_to_torch_save``) + that entry +
``model.load_state_dict(strict=False)`` (after stripping a ``module.`` prefix on every key and
dropping tensors of another shape, which torch refuses where surgery skips them). Or surgery
raised a ``SurgeryError`` and the model is bit-identical; for the cases that must load (a
named entry of a safe form, nothing tied differently) an error fails the test too. Naming an
entry that holds no weights must raise. A failure prints the generated case.

Bounded in the suite: a fixed (derandomized) sample of ``SURGERY_DIFF_EXAMPLES`` cases per
form (default 50), no shrinking. The long run, random and shrinking failures:

    SURGERY_DIFF_EXAMPLES=2000 .venv/bin/python -m pytest tests/loading/test_differential.py
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, Phase, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from torch import nn

import surgery

_LONG = "SURGERY_DIFF_EXAMPLES" in os.environ
_EXAMPLES = int(os.environ.get("SURGERY_DIFF_EXAMPLES", "50"))
_SETTINGS = settings(
    max_examples=_EXAMPLES,
    deadline=None,
    derandomize=not _LONG,
    database=None,
    phases=[Phase.explicit, Phase.generate, *([Phase.shrink] if _LONG else [])],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
COPY_NAMES = ["model", "model_ema", "state_dict", "state_dict_ema", "teacher", "student", "ema"]


# --------------------------------------------------------------------------- the case


@dataclass
class Layer:
    name: str
    shape: tuple[int, int]  # (out, in) of its weight
    bias: bool
    dtype: str


@dataclass
class Copy:
    """One copy of the weights in the checkpoint, and how it differs from the model."""

    seed: int
    dtype: str | None = None  # every floating tensor cast to this
    tie: str = "tied"  # tied | untied | embed-only | head-only (a tied model's pair)
    views: str = "none"  # none | slices (same-shaped weights slice one tensor) | transposed
    head_rows: int = 0  # extra rows of the head: a mismatched shape
    drop: str | None = None  # a key left out
    extra: bool = False  # an extra tensor the model does not have
    version: bool = False  # a non-tensor value among the tensors
    prefix: bool = False  # DDP's "module." on every key


@dataclass
class Case:
    layers: list[Layer]
    tied: bool  # the model ties lm_head.weight to embed.weight
    buffers: bool
    copies: list[Copy]
    names: list[str]  # container entry of each copy (random order); [] when flat
    nested: int | None  # the copy nested one level deeper ({"model": {"module": sd}})
    training: bool  # epoch and optimizer state beside the copies
    momentum: bool  # optimizer state holds tensors shaped like the weights
    fmt: str = ""
    extra_notes: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        lines = [f"format: {self.fmt}", f"model: tied={self.tied} buffers={self.buffers}"]
        lines += [f"  {la}" for la in self.layers]
        where = self.names or ["<flat>"]
        for i, (c, n) in enumerate(zip(self.copies, where, strict=False)):
            nest = " (nested under 'module')" if self.nested == i else ""
            lines.append(f"  copy {n!r}{nest}: {c}")
        lines.append(f"training state: {self.training}, momentum tensors: {self.momentum}")
        return "\n".join(lines + self.extra_notes)


def _layer_names(n: int) -> list[str]:
    return ["a", "b", "c", "head"][:n] if n < 4 else ["a", "b", "c", "head"]


@st.composite
def cases(draw: st.DrawFn, fmt: str, copies: str) -> Case:
    """A case for ``fmt``; ``copies`` is 'one' (one tensor dict in the file), 'many' (several
    same-shaped copies and optimizer tensors) or 'flat' (one copy at the top level)."""
    n = draw(st.integers(2, 4))
    dims = st.sampled_from([2, 3])
    layers = [
        Layer(
            name,
            (draw(dims), draw(dims)),
            draw(st.booleans()),
            draw(st.sampled_from(list(DTYPES))),
        )
        for name in _layer_names(n)
    ]
    tied = draw(st.booleans())
    buffers = draw(st.booleans())
    keys = _model_keys(layers, tied, buffers)
    n_copies = draw(st.integers(2, 3)) if copies == "many" else 1

    def one_copy() -> Copy:
        return Copy(
            seed=draw(st.integers(0, 2**16)),
            dtype=draw(st.sampled_from([None, None, *DTYPES])),
            tie=draw(st.sampled_from(["tied", "untied", "embed-only", "head-only"])),
            views=draw(st.sampled_from(["none", "none", "slices", "transposed"])),
            head_rows=draw(st.sampled_from([0, 0, 1])),
            drop=draw(st.sampled_from([None, None, *keys])),
            extra=draw(st.booleans()),
            version=draw(st.booleans()),
            prefix=draw(st.sampled_from([False, False, True])),
        )

    made = [one_copy() for _ in range(n_copies)]
    if copies == "flat":
        return Case(layers, tied, buffers, made, [], None, False, False, fmt)
    names = draw(st.permutations(COPY_NAMES))[:n_copies]
    nested = draw(st.sampled_from([None, *range(n_copies)]))
    training = draw(st.booleans())
    momentum = copies == "many" and draw(st.booleans())
    order = draw(st.permutations(range(n_copies)))  # the key order in the container
    made = [made[i] for i in order]
    names = [names[i] for i in order]
    return Case(layers, tied, buffers, made, names, nested, training, momentum, fmt)


def _model_keys(layers: list[Layer], tied: bool, buffers: bool) -> list[str]:
    keys = []
    for la in layers:
        keys.append(f"{la.name}.weight")
        if la.bias:
            keys.append(f"{la.name}.bias")
    if tied:
        keys += ["embed.weight", "lm_head.weight"]
    if buffers:
        keys += ["steps", "running"]
    return keys


# --------------------------------------------------------------------------- model and weights


def build_model(case: Case) -> nn.Module:
    torch.manual_seed(1234)
    model = nn.Module()
    for la in case.layers:
        out, inp = la.shape
        setattr(model, la.name, nn.Linear(inp, out, bias=la.bias).to(DTYPES[la.dtype]))
    if case.tied:
        model.embed = nn.Embedding(5, 3)
        model.lm_head = nn.Linear(3, 5, bias=False)
        model.lm_head.weight = model.embed.weight
    if case.buffers:
        model.register_buffer("steps", torch.tensor([7], dtype=torch.int64))
        model.register_buffer("running", torch.rand(3))
    return model


def make_weights(case: Case, c: Copy) -> dict[str, Any]:
    """One copy's state dict, made as a training script would leave it."""
    gen = torch.Generator().manual_seed(c.seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen)

    sd: dict[str, Any] = {}
    same: dict[tuple[int, int], list[str]] = {}
    for la in case.layers:
        out, inp = la.shape
        if la.name == "head":
            out += c.head_rows
        same.setdefault((out, inp), []).append(f"{la.name}.weight")
        sd[f"{la.name}.weight"] = rand(out, inp)
        if la.bias:
            sd[f"{la.name}.bias"] = rand(out)
    if c.views == "slices":  # weights of one shape are slices of one tensor
        for (out, inp), names in same.items():
            if len(names) > 1:
                block = rand(len(names), out, inp)
                for i, k in enumerate(names):
                    sd[k] = block[i]
    elif c.views == "transposed":  # non-contiguous views
        for k in list(sd):
            if k.endswith(".weight"):
                sd[k] = sd[k].t().contiguous().t()
    if case.tied:
        embed = rand(5, 3)
        head = embed if c.tie == "tied" else rand(5, 3)
        if c.tie != "head-only":
            sd["embed.weight"] = embed
        if c.tie != "embed-only":
            sd["lm_head.weight"] = head
    if case.buffers:
        sd["steps"] = torch.randint(0, 100, (1,), generator=gen)
        sd["running"] = torch.rand(3, generator=gen)
    if c.dtype is not None:
        cast = {id(v): v.to(DTYPES[c.dtype]) for v in sd.values() if v.is_floating_point()}
        # one cast per tensor, so a tied pair stays one tensor and slices stay slices
        bases: dict[int, torch.Tensor] = {}
        for k, v in list(sd.items()):
            if not v.is_floating_point():
                continue
            if v._base is not None:
                base = bases.setdefault(id(v._base), v._base.to(DTYPES[c.dtype]))
                sd[k] = base.as_strided(v.shape, v.stride(), v.storage_offset())
            else:
                sd[k] = cast[id(v)]
    if c.drop is not None:
        sd.pop(c.drop, None)
    if c.extra:
        sd["aux.weight"] = rand(2)
    if c.prefix:
        sd = {"module." + k: v for k, v in sd.items()}
    if c.version:
        sd["version"] = 2
    return sd


def make_object(case: Case) -> Any:
    """The object a training script saves: flat, or a container in the case's key order."""
    weights = [make_weights(case, c) for c in case.copies]
    if not case.names:
        return weights[0]
    obj: dict[str, Any] = {}
    for i, (name, sd) in enumerate(zip(case.names, weights, strict=True)):
        obj[name] = {"module": sd} if case.nested == i else sd
    if case.training:
        obj["epoch"] = 3
        state: dict = {}
        if case.momentum:
            first = weights[0]
            state = {
                i: {"momentum_buffer": torch.zeros_like(v)}
                for i, v in enumerate(first.values())
                if isinstance(v, torch.Tensor)
            }
        obj["optimizer"] = {"state": state, "param_groups": [{"lr": 0.1, "params": []}]}
    return obj


# --------------------------------------------------------------------------- writing


def flat_tensors(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """What a safetensors file can hold: own contiguous tensors, a tied pair once."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[tuple, str] = {}
    for k, v in obj.items():
        if not isinstance(v, torch.Tensor):
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), v.shape, v.stride())
        if ident in seen:  # a tied pair: keep the first name, as save_model does
            continue
        seen[ident] = k
        out[k] = v.contiguous().clone()
    return out


def write(case: Case, obj: Any, folder: Path) -> Any:
    """``obj`` in ``case.fmt``; returns what load_partial takes."""
    fmt = case.fmt
    if fmt == "memory":
        return obj
    if fmt in ("zip", "legacy", "proto2", "proto4"):
        path = folder / "ckpt.pth"
        torch.save(
            obj,
            path,
            _use_new_zipfile_serialization=fmt != "legacy",
            pickle_protocol={"proto4": 4}.get(fmt, 2),
        )
        return path
    if fmt == "safetensors":
        path = folder / "model.safetensors"
        safetensors.torch.save_file(flat_tensors(obj), path)
        return path
    if fmt in ("sharded", "sharded-bin"):
        from huggingface_hub import save_torch_state_dict

        (folder / "sharded").mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            save_torch_state_dict(
                flat_tensors(obj),
                folder / "sharded",
                max_shard_size=60,
                safe_serialization=fmt == "sharded",
            )
        return folder / "sharded"
    if fmt == "dcp":
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(obj, checkpoint_id=str(folder / "dcp"), no_dist=True)
        return folder / "dcp"
    raise AssertionError(fmt)


def read_back(case: Case, ckpt: Any, folder: Path) -> Any:
    """The oracle's view of the checkpoint: what the plain libraries read from it."""
    fmt = case.fmt
    if fmt == "memory":
        return ckpt
    if fmt == "safetensors":
        return safetensors.torch.load_file(ckpt)
    if fmt == "sharded":
        out: dict[str, torch.Tensor] = {}
        for f in sorted(Path(ckpt).glob("*.safetensors")):
            out.update(safetensors.torch.load_file(f))
        return out
    if fmt == "sharded-bin":
        out = {}
        for f in sorted(Path(ckpt).glob("*.bin")):
            out.update(torch.load(f, weights_only=False))
        return out
    if fmt == "dcp":
        from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp_to_torch_save(str(ckpt), str(folder / "dcp.pt"))
        return torch.load(folder / "dcp.pt", weights_only=False)
    return torch.load(ckpt, weights_only=False)


# --------------------------------------------------------------------------- checking


def entries(case: Case) -> list[list[str]]:
    """Every entry a user could name: each copy (nested ones at both levels)."""
    if not case.names:
        return []
    out = []
    for i, name in enumerate(case.names):
        out.append([name, "module"] if case.nested == i else [name])
        if case.nested == i:
            out.append([name])  # {"module": sd}: the container of one state dict
    return out


def oracle(case: Case, obj: Any, path: list[str], before: nn.Module) -> dict[str, torch.Tensor]:
    """torch's load_state_dict(strict=False) of the entry at ``path`` into a copy of the model."""
    sd = obj
    for p in path:
        sd = sd[p]
    if set(sd) == {"module"} and isinstance(sd["module"], dict):
        sd = sd["module"]
    tensor_keys = [k for k, v in sd.items() if isinstance(v, torch.Tensor)]
    if tensor_keys and all(k.startswith("module.") for k in tensor_keys):
        sd = {k.removeprefix("module."): v for k, v in sd.items()}
    model = copy.deepcopy(before)
    state = model.state_dict()
    fits = {
        k: v
        for k, v in sd.items()
        if not (isinstance(v, torch.Tensor) and k in state and v.shape != state[k].shape)
    }
    model.load_state_dict(fits, strict=False)
    return model.state_dict()


def allowed_errors(case: Case, path: list[str] | None) -> tuple[type[Exception], ...]:
    """The errors surgery may raise for this load; ``()``: it must load. A safe form, an
    explicit entry (or one copy) and no tied pair held as two tensors must load; a tiny
    prefixed copy may be refused as ambiguous (one key could belong to two layers)."""
    if case.fmt == "proto4":
        return (surgery.SurgeryError,)  # weights-only loading cannot read it (today)
    if path is None and len(case.copies) > 1:
        return (surgery.SurgeryError,)  # several copies: the default may be ambiguous
    c = case.copies[0] if path is None else case.copies[case.names.index(path[0])]
    if case.tied and c.tie == "untied":
        return (surgery.KeyCollisionError,)  # two different tensors for one tied parameter
    if case.tied and c.tie == "tied" and case.fmt == "dcp":
        return (surgery.KeyCollisionError,)  # DCP stores the pair as two tensors
    if c.prefix:
        return (surgery.PrefixTieError,)
    return ()


def say(text: str) -> None:
    """A line printed with a failing example (outside hypothesis: printed)."""
    try:
        note(text)
    except InvalidArgument:
        print(text)


def check(case: Case, folder: Path) -> None:
    say(repr(case))
    obj = make_object(case)
    ckpt = write(case, obj, folder)
    seen = read_back(case, ckpt, folder)
    before = build_model(case)
    paths: list[list[str] | None] = [None, *entries(case)]
    for path in paths:
        entry = None if path is None else ".".join(path)
        model = copy.deepcopy(before)
        try:
            report = surgery.load_partial(model, ckpt, entry=entry)
        except surgery.SurgeryError as e:
            say(f"entry={entry!r}: {type(e).__name__}: {str(e)[:300]}")
            _assert_same(model, before, f"entry={entry!r} raised but changed the model")
            assert isinstance(e, allowed_errors(case, path)), f"entry={entry!r} must load: {e}"
            continue
        chosen = path
        if path is None:  # the default: the entry surgery says it unwrapped
            chosen = _container(report.source) + _container_prefix(report.prefix, seen)
            say(f"default entry read {report.source}, prefix {report.prefix}: {chosen}")
            expected = _default_entry(obj)
            assert expected is None or chosen == expected, (
                f"the default entry is {chosen}, where a torch file or dict gives {expected}"
            )
        want = oracle(case, seen, chosen or [], before)
        got = model.state_dict()
        bad = [k for k in got if not torch.equal(got[k], want[k])]
        assert not bad, f"entry={entry!r} ({report.source}): values differ from torch in {bad}"
    if case.training:  # an entry that holds no weights is refused
        model = copy.deepcopy(before)
        with pytest.raises(surgery.SurgeryError):
            surgery.load_partial(model, ckpt, entry="epoch")
        _assert_same(model, before, "entry='epoch' changed the model")


def _container(source: str) -> list[str]:
    """['model', 'module'] from "ckpt.pth['model']['module']" (a DCP folder: "dir['model']")."""
    out = []
    while source.endswith("']"):
        head, _, name = source[:-2].rpartition("['")
        out.insert(0, name)
        source = head
    return out


def _container_prefix(prefix: tuple[str, str] | None, obj: Any) -> list[str]:
    """A stripped prefix that names container entries (a DCP folder read flat: 'model.')."""
    if not prefix or prefix[1] or not isinstance(obj, dict):
        return []
    out: list[str] = []
    inner: Any = obj
    for p in prefix[0].rstrip(".").split("."):
        if not isinstance(inner, dict) or p not in inner:
            break  # the rest is a prefix of the keys ('module.'), stripped by the oracle
        out.append(p)
        inner = inner[p]
    return out


def _default_entry(obj: Any) -> list[str] | None:
    """The entry a torch file holding ``obj`` is unwrapped to by default (None: refused)."""
    from surgery.sources.unwrap import unwrap

    try:
        return unwrap(obj).container
    except surgery.SurgeryError:
        return None


def _assert_same(model: nn.Module, before: nn.Module, what: str) -> None:
    got, want = model.state_dict(), before.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want), what


# --------------------------------------------------------------------------- the tests

FORMS = [
    ("memory", "many"),
    ("memory", "flat"),
    ("zip", "one"),
    ("zip", "many"),
    ("legacy", "many"),
    ("proto2", "one"),
    ("proto2", "many"),
    ("proto4", "many"),
    ("safetensors", "flat"),
    ("sharded", "flat"),
    ("sharded-bin", "flat"),
    ("dcp", "many"),
]


@pytest.mark.parametrize(("fmt", "copies"), FORMS)
def test_load_partial_gives_what_torch_gives(tmp_path_factory, fmt, copies):
    @_SETTINGS
    @given(case=cases(fmt, copies))
    def run(case: Case) -> None:
        check(case, tmp_path_factory.mktemp(fmt))

    run()


def test_the_checker_catches_wrong_values(tmp_path, monkeypatch):
    """A load that puts another copy's values in the model fails the check."""
    case = Case(
        [Layer("a", (2, 3), True, "float32"), Layer("b", (2, 3), False, "float32")],
        tied=False,
        buffers=False,
        copies=[Copy(seed=1), Copy(seed=2)],
        names=["model_ema", "model"],
        nested=None,
        training=False,
        momentum=False,
        fmt="memory",
    )
    real = surgery.load_partial

    def wrong(model, ckpt, *, entry=None, **kw):  # the EMA copy, whatever was asked
        return real(model, ckpt, entry="model_ema", **kw)

    monkeypatch.setattr(surgery, "load_partial", wrong)
    with pytest.raises(AssertionError, match="default entry is"):
        check(case, tmp_path)
    monkeypatch.setattr(
        surgery,
        "load_partial",
        lambda m, c, *, entry=None, **kw: real(
            m, c, entry="model_ema" if entry == "model" else entry, **kw
        ),
    )
    with pytest.raises(AssertionError, match="entry='model'.*values differ from torch"):
        check(case, tmp_path / "named")


def test_dcp_default_entry_is_the_one_a_torch_file_gives(tmp_path):
    """Found by the differential test: a DCP folder holding ``model`` and ``model_ema`` was read
    flat, and the prefix reading that matched more keys decided; a torch file or a dict
    holding the same object gives ``model`` (the weights-container name) by default, and so
    does the folder now (its nesting rebuilt from DCP's planner_data)."""
    import torch.distributed.checkpoint as dcp

    torch.manual_seed(0)
    live, ema = nn.Linear(3, 2).state_dict(), nn.Linear(3, 2).state_dict()
    obj = {"model": {"weight": live["weight"]}, "model_ema": ema}  # the live copy lacks a key
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(obj, checkpoint_id=str(tmp_path / "dcp"), no_dist=True)
    torch.save(obj, tmp_path / "ckpt.pth")
    from_file, from_dcp = nn.Linear(3, 2), nn.Linear(3, 2)
    assert surgery.load_partial(from_file, tmp_path / "ckpt.pth").source.endswith("['model']")
    report = surgery.load_partial(from_dcp, tmp_path / "dcp")
    assert torch.equal(from_dcp.weight, from_file.weight)  # was: the EMA copy's
    assert report.source.endswith("['model']")
