"""The restricted unpickler (surgery/sources/unpickler.py): allow-list only, nothing runs."""

from __future__ import annotations

import collections
import os
import pickle

import pytest

from surgery.errors import CheckpointError, UnsafeCheckpointError, UsageError
from surgery.sources.unpickler import (
    PLAIN_GLOBALS,
    Refused,
    allowed_from,
    global_names,
    refused_in,
    restricted_loads,
)


class _Payload:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


class _Hparams:
    def __init__(self) -> None:
        self.lr = 0.1


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
def test_plain_data_round_trips_like_pickle(protocol):
    obj = {"a": [1, 2.5, "x", b"\x00\xff", None, True], "b": collections.OrderedDict(z=(1, 2))}
    obj["c"] = {frozenset({1}), 3}
    data = pickle.dumps(obj, protocol=protocol)
    assert restricted_loads(data, where="f", allowed=PLAIN_GLOBALS).value == pickle.loads(data)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_code_never_runs_and_every_global_is_named(tmp_path, protocol):
    target = tmp_path / "PWNED"
    data = pickle.dumps({"w": 1, "x": _Payload(str(target))}, protocol=protocol)
    with pytest.raises(UnsafeCheckpointError, match=r"posix\.mkdir|os\.mkdir") as e:
        restricted_loads(data, where="evil.pkl", allowed=PLAIN_GLOBALS)
    assert "evil.pkl" in str(e.value) and "trust_pickle=True" in str(e.value)
    assert not target.exists()
    # As stand-ins, the payload is kept inert and named.
    out = restricted_loads(data, where="evil.pkl", allowed=PLAIN_GLOBALS, stub_refused=True)
    assert not target.exists()
    assert isinstance(out.value["x"], Refused) and out.value["w"] == 1
    assert refused_in(out.value) == out.refused == [f"{os.mkdir.__module__}.mkdir"]
    assert refused_in(out.value["w"]) == []


def test_objects_become_inert_stand_ins():
    data = pickle.dumps({"hp": _Hparams(), "n": 3}, protocol=4)
    out = restricted_loads(data, where="f", allowed=PLAIN_GLOBALS, stub_refused=True)
    assert out.refused == [f"{__name__}._Hparams"]
    assert not hasattr(out.value["hp"], "lr")  # its state was not applied
    assert global_names(data) == [f"{__name__}._Hparams"]


def test_broken_pickles_are_checkpoint_errors():
    data = pickle.dumps({"a": list(range(100))}, protocol=4)
    for bad in (data[: len(data) // 2], b"", b"\x80\x04junk", data.replace(b"\x94", b"\xff", 1)):
        with pytest.raises(CheckpointError, match="truncated or corrupt|safe loading"):
            restricted_loads(bad, where="f", allowed=PLAIN_GLOBALS)


def test_codecs_encode_only_latin1():
    data = pickle.dumps(b"\x01\x02", protocol=2)
    assert restricted_loads(data, where="f", allowed=PLAIN_GLOBALS).value == b"\x01\x02"
    evil = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(CheckpointError):
        restricted_loads(evil, where="f", allowed=PLAIN_GLOBALS)


def test_allowed_from_objects_and_user_named_strings():
    got = allowed_from([_Hparams, "collections.Counter"])
    assert got == {f"{__name__}._Hparams": _Hparams, "collections.Counter": collections.Counter}
    data = pickle.dumps(_Hparams(), protocol=4)
    assert restricted_loads(data, where="f", allowed={**PLAIN_GLOBALS, **got}).value.lr == 0.1
    for bad in ("no_such_module_xyz.Thing", 42, [42]):
        with pytest.raises(UsageError):
            allowed_from(bad if isinstance(bad, list) else [bad])
