"""The restricted unpickler (surgery/sources/unpickler.py): allow-list only, nothing runs."""

from __future__ import annotations

import collections
import os
import pickle

import pytest

from surgery.errors import CheckpointError, UnsafeCheckpointError, UsageError
from surgery.sources.allowlist import allowed_from
from surgery.sources.unpickler import (
    PLAIN_GLOBALS,
    Refused,
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


# --------------------------------------------------------------------------- opcode rules


def _refused(data: bytes, allowed=PLAIN_GLOBALS, match: str | None = None) -> str:
    with pytest.raises(CheckpointError, match=match) as e:
        restricted_loads(data, where="hostile.pkl", allowed=allowed)
    return str(e.value)


def test_state_is_never_set_on_a_class_or_a_function():
    import argparse

    allowed = {**PLAIN_GLOBALS, "argparse.Namespace": argparse.Namespace}
    # BUILD with slot state on the class itself would set argparse.Namespace.__eq__.
    evil = b"\x80\x02cargparse\nNamespace\nN}U\x06__eq__K\x01s\x86b."
    _refused(evil, allowed, "sets the state of")
    assert argparse.Namespace.__eq__ != 1
    evil = b"\x80\x02c_codecs\nencode\nN}U\x0c__defaults__)s\x86b."
    _refused(evil, allowed, "sets the state of")
    # On an instance it is plain data, as torch's weights-only loader allows.
    data = pickle.dumps(argparse.Namespace(a=1), protocol=2)
    assert restricted_loads(data, where="f", allowed=allowed).value == argparse.Namespace(a=1)


def test_allocations_are_bounded_by_the_input():
    _refused(b"\x80\x02c__builtin__\nbytearray\nJ\x00\x00\x00\x40\x85R.", match="bytearray")
    huge = b"\x80\x05\x96" + (1 << 40).to_bytes(8, "little") + b"."
    _refused(huge, match="more than the pickle holds")


def test_extension_codes_and_calls_of_unlisted_objects_are_refused():
    import copyreg

    copyreg.add_extension("collections", "OrderedDict", 0xF0)
    try:
        _refused(b"\x80\x02\x82\xf0)R.", match="extension")
    finally:
        copyreg.remove_extension("collections", "OrderedDict", 0xF0)
    # A dict is no callable of the list: REDUCE on it is refused, not attempted.
    _refused(b"\x80\x02})R.", match="calls")
    # Items go into dicts, lists and sets only.
    text = b"X\x01\x00\x00\x00aX\x06\x00\x00\x00latin1\x86R"
    _refused(b"\x80\x02c_codecs\nencode\n" + text + b"K\x01K\x02s.", match="adds items")


@pytest.mark.distributed  # spawns a process
def test_keys_nested_too_deeply_to_hash_are_refused_without_a_crash():
    # CPython hashes nested tuples recursively with no depth guard: a key like this used to
    # crash the process. Checked in a child process, so that a crash fails only this test.
    code = (
        "import pickle\n"
        "from surgery.errors import CheckpointError\n"
        "from surgery.sources.unpickler import PLAIN_GLOBALS, restricted_loads\n"
        "deep = b'\\x80\\x02}' + b')' + b'\\x85' * 1_000_000 + b'K\\x01s.'\n"
        "try:\n"
        "    restricted_loads(deep, where='f', allowed=PLAIN_GLOBALS)\n"
        "except CheckpointError as e:\n"
        "    print('refused' if 'too deeply' in str(e) else e)\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "refused", (out.returncode, out.stderr)
    shallow = pickle.dumps({((1, 2), 3): "ok", frozenset({(1,)}): 2}, protocol=4)
    assert restricted_loads(shallow, where="f", allowed=PLAIN_GLOBALS).value[((1, 2), 3)] == "ok"


def test_sequential_pickles_are_read_from_a_file():
    import io

    buf = io.BytesIO(pickle.dumps(1) + pickle.dumps([2, 3], protocol=4) + b"tail")
    assert restricted_loads(buf, where="f", allowed={}).value == 1
    second = restricted_loads(buf, where="f", allowed={})
    assert second.value == [2, 3] and buf.read() == b"tail"
