"""Property test: mutated checkpoint files raise nothing but SurgeryError, model unchanged.

Small valid ``.safetensors``, ``.pth`` (zip, protocol 2 and 4; legacy), raw ``.pkl`` (numpy)
and ``*.index.json`` files and a DCP folder are built once, then hypothesis flips bytes,
truncates them, rewrites the index JSON or points the DCP storage entries elsewhere.
``read_checkpoint``,
``load_partial`` and ``surgery inspect`` must each either succeed or raise a ``SurgeryError``,
and a refused load leaves the model bit-for-bit as it was. A training checkpoint (weights,
optimizer and scheduler state) is mutated the same way, and hostile optimizer / scheduler
structures are generated: ``restore_optimizer`` and ``restore_scheduler`` succeed or raise a
``SurgeryError`` leaving the optimizer and the scheduler bit-for-bit as they were. A fixed
example budget keeps it in the suite (``slow``); tests/fuzz/fuzz_load.py runs the load checks
under atheris for longer.
"""

from __future__ import annotations

import json
import pickle
import resource
import tempfile
import warnings
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

import surgery
from surgery.errors import SurgeryError

from support import OUTSIDE, check_entry_points

hypothesis = pytest.importorskip("hypothesis")
st = pytest.importorskip("hypothesis.strategies")

pytestmark = pytest.mark.slow

_SETTINGS = hypothesis.settings(
    max_examples=50,
    deadline=timedelta(seconds=20),
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
_MAX_GROWTH_KB = 500 * 1024  # peak memory may grow by at most 500 MB over the whole run


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3, 2)
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in Small().state_dict().items()}


def _fresh_training() -> tuple[Small, torch.optim.Optimizer, LambdaLR]:
    """A model, its SGD optimizer after one step (so it has state) and a LambdaLR on it."""
    torch.manual_seed(0)
    model = Small()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model.fc(torch.ones(2, 3)).sum().backward()
    opt.step()
    return model, opt, LambdaLR(opt, lambda step: 1 / (1 + step))


def _originals() -> dict[str, bytes]:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d)
        save_file(_state(), folder / "m.safetensors")
        torch.save(_state(), folder / "m.pth")
        torch.save(_state(), folder / "m4.pth", pickle_protocol=4)
        torch.save(_state(), folder / "legacy.pth", _use_new_zipfile_serialization=False)
        arrays = {k: v.numpy() for k, v in _state().items()}
        (folder / "m.pkl").write_bytes(pickle.dumps({"model": arrays}, protocol=2))
        model, opt, sched = _fresh_training()
        for _ in range(3):
            opt.step()
            sched.step()
        training = {
            "state_dict": model.state_dict(),
            "optimizer": opt.state_dict(),
            "lr_scheduler": sched.state_dict(),
        }
        torch.save(training, folder / "train.pth")
        # Outside the checkpoint's folder: values no load may ever bring in.
        save_file({k: torch.full_like(v, OUTSIDE) for k, v in _state().items()}, folder / "o")
        return {
            "m.safetensors": (folder / "m.safetensors").read_bytes(),
            "m.pth": (folder / "m.pth").read_bytes(),
            "m4.pth": (folder / "m4.pth").read_bytes(),
            "legacy.pth": (folder / "legacy.pth").read_bytes(),
            "m.pkl": (folder / "m.pkl").read_bytes(),
            "train.pth": (folder / "train.pth").read_bytes(),
            "outside": (folder / "o").read_bytes(),
        }


_ORIGINALS = _originals()


def _dcp_originals() -> dict[str, bytes]:
    """A DCP folder of Small's state in two data files (as two ranks write), file by file;
    ``out/...``: the same layout holding 7s, for a folder beside it that no load may read."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    out = {}
    with tempfile.TemporaryDirectory() as d, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, sd in [
            ("", _state()),
            ("out/", {k: torch.full_like(v, OUTSIDE) for k, v in _state().items()}),
        ]:
            folder = Path(d) / (name or "ckpt")
            writer = dcp.FileSystemWriter(str(folder), thread_count=2)
            dcp.save(sd, storage_writer=writer, no_dist=True)
            out.update({name + p.name: p.read_bytes() for p in folder.iterdir()})
    return out


_DCP = _dcp_originals()
_BASELINE_KB = 0  # the process's peak when this module's first test starts (_baseline)


@pytest.fixture(autouse=True, scope="module")
def _baseline() -> None:
    """Peak memory is measured from this module's start, not from collection: tests that run
    before it in the same process (large heads, whole recipes) raise the peak on their own."""
    global _BASELINE_KB
    _BASELINE_KB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _check(path: Path) -> None:
    """The three entry points on ``path`` (``support.check_entry_points``), and the peak
    memory they needed."""
    check_entry_points(path, Small())
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _BASELINE_KB
    assert grown < _MAX_GROWTH_KB, f"peak memory grew by {grown // 1024} MB"


_edits = st.lists(st.tuples(st.integers(0, 1 << 20), st.integers(0, 255)), max_size=8)


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    raw = bytearray(data)
    for pos, value in edits:
        raw[pos % len(raw)] = value
    if cut is not None:
        raw = raw[: cut % (len(raw) + 1)]
    return bytes(raw)


@_SETTINGS
@hypothesis.given(
    name=st.sampled_from(["m.pth", "m4.pth", "legacy.pth", "m.pkl", "m.safetensors"]),
    edits=_edits,
    cut=st.none() | st.integers(0, 1 << 20),
    header_bias=st.booleans(),
)
def test_mutated_files_raise_only_surgery_errors(
    name: str, edits: list[tuple[int, int]], cut: int | None, header_bias: bool
) -> None:
    data = _ORIGINALS[name]
    if header_bias and name.endswith(".safetensors"):
        # Most flips land in the JSON header, where the parser has decisions to make.
        n = int.from_bytes(data[:8], "little") + 8
        edits = [(pos % n, v) for pos, v in edits]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(_mutate(data, edits, cut))
        _check(path)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)
_names = st.sampled_from(
    ["w.safetensors", "./w.safetensors", "../w.safetensors", "link", "OUTSIDE", "x.index.json"]
)


@_SETTINGS
@hypothesis.given(
    weight_map=st.dictionaries(st.sampled_from(["fc.weight", "fc.bias", "steps"]), _names),
    junk=st.none() | st.tuples(st.sampled_from(["fc.weight", "other"]), _json),
    top=st.none() | _json,
)
def test_mutated_indexes_raise_only_surgery_errors(
    weight_map: dict, junk: tuple | None, top: object
) -> None:
    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / "ckpt"
        folder.mkdir()
        outside = Path(d) / "w.safetensors"
        (folder / "w.safetensors").write_bytes(_ORIGINALS["m.safetensors"])
        outside.write_bytes(_ORIGINALS["outside"])
        (folder / "link").symlink_to(outside)
        weight_map = {k: str(outside) if v == "OUTSIDE" else v for k, v in weight_map.items()}
        if junk is not None:
            weight_map[junk[0]] = junk[1]
        index = folder / "model.safetensors.index.json"
        index.write_text(json.dumps({"weight_map": weight_map} if top is None else top))
        _check(index)


_dcp_paths = st.sampled_from(
    [
        "__0_0.distcp",
        "__0_1.distcp",
        "../out/__0_0.distcp",
        "OUTSIDE",
        "link",
        "",
        ".",
        "x/../__0_1.distcp",
    ]
)


@_SETTINGS
@hypothesis.given(
    name=st.sampled_from([".metadata", "__0_0.distcp", "__0_1.distcp"]),
    edits=_edits,
    cut=st.none() | st.integers(0, 1 << 20),
    paths=st.dictionaries(st.sampled_from(["fc.weight", "fc.bias", "steps"]), _dcp_paths),
)
def test_mutated_dcp_folders_raise_only_surgery_errors(
    name: str, edits: list[tuple[int, int]], cut: int | None, paths: dict[str, str]
) -> None:
    """Flipped or cut bytes in .metadata or a data file, storage entries pointed out of the
    folder (``..``, absolute, a symlink out): loads succeed or raise a SurgeryError, never
    write on a refusal, never read the 7s of the folder beside."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        (root / "ckpt").mkdir()
        (root / "out").mkdir()
        for rel, data in _DCP.items():
            (root / (rel if rel.startswith("out/") else f"ckpt/{rel}")).write_bytes(data)
        (root / "ckpt" / "link").symlink_to(root / "out" / "__0_0.distcp")
        if paths:  # the test wrote this pickle itself: plain pickle is fine here
            md = pickle.loads(_DCP[".metadata"])
            for index, info in md.storage_data.items():
                if index.fqn in paths:
                    rel = paths[index.fqn]
                    info.relative_path = (
                        str(root / "out" / "__0_0.distcp") if rel == "OUTSIDE" else rel
                    )
            (root / "ckpt" / ".metadata").write_bytes(pickle.dumps(md))
        path = root / "ckpt" / name
        path.write_bytes(_mutate(path.read_bytes(), edits, cut))
        _check(root / "ckpt")


# --------------------------------------------------------------------------- training state


def _opt_snapshot(opt: torch.optim.Optimizer, sched: LambdaLR) -> tuple:
    params = [p for g in opt.param_groups for p in g["params"]]
    state = [
        {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state[p].items()} for p in params
    ]
    groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    return state, groups, dict(sched.state_dict())


def _same(a: object, b: object) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b or (a != a and b != b)  # NaN equals NaN here


def _check_training(old: object) -> None:
    """restore_optimizer and restore_scheduler on ``old`` (a path or a dict): success, or a
    SurgeryError with the optimizer and the scheduler exactly as they were."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, sched = _fresh_training()
        before = _opt_snapshot(opt, sched)
        try:
            surgery.restore_optimizer(opt, model, old)
        except SurgeryError:
            assert _same(_opt_snapshot(opt, sched), before), "optimizer changed by a refusal"
        before = _opt_snapshot(opt, sched)
        try:
            surgery.restore_scheduler(sched, old)
        except SurgeryError:
            assert _same(_opt_snapshot(opt, sched), before), "scheduler changed by a refusal"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - _BASELINE_KB
    assert grown < _MAX_GROWTH_KB, f"peak memory grew by {grown // 1024} MB"


@_SETTINGS
@hypothesis.given(edits=_edits, cut=st.none() | st.integers(0, 1 << 20))
def test_mutated_training_checkpoints_raise_only_surgery_errors(
    edits: list[tuple[int, int]], cut: int | None
) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.pth"
        path.write_bytes(_mutate(_ORIGINALS["train.pth"], edits, cut))
        _check_training(path)


_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=8)
    | st.sampled_from(["fc.weight", "fc.bias", 0, 1, 2])
)
_tensors = st.sampled_from([(2, 3), (2,), (3,), (), (0,), (2, 1), (1, 3), "meta", "sparse"]).map(
    lambda s: (
        torch.empty(2, 3, device="meta")
        if s == "meta"
        else torch.ones(2).to_sparse()
        if s == "sparse"
        else torch.ones(s)
    )
)
_values = st.recursive(
    _scalars | _tensors,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_param_state = st.dictionaries(
    st.sampled_from(["momentum_buffer", "step", "exp_avg"]) | st.text(max_size=4), _values
)
_group = st.fixed_dictionaries(
    {"params": st.lists(_scalars, max_size=4) | _values},
    optional={
        "param_names": st.lists(st.sampled_from(["fc.weight", "fc.bias", "x"]), max_size=3)
        | _values,
        "lr": _values,
    },
)
_optimizer = st.fixed_dictionaries(
    {
        "state": st.dictionaries(_scalars, _param_state | _values, max_size=3),
        "param_groups": st.lists(_group | _values, max_size=3),
    },
    optional={"format": st.just("surgery.optimizer_state"), "shapes": _values},
)
_scheduler = st.fixed_dictionaries(
    {"last_epoch": _values},
    optional={"best": _values, "num_bad_epochs": _values, "_step_count": _values},
)


@_SETTINGS
@hypothesis.given(
    optimizer=_optimizer | _values, scheduler=_scheduler | _values, as_file=st.booleans()
)
def test_hostile_optimizer_and_scheduler_state_raise_only_surgery_errors(
    optimizer: object, scheduler: object, as_file: bool
) -> None:
    training = {"state_dict": _state(), "optimizer": optimizer, "lr_scheduler": scheduler}
    if not as_file:
        _check_training(training)
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.pth"
        torch.save(training, path)
        _check_training(path)
