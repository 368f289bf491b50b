"""load_partial on sharded models: FSDP2 ``fully_shard`` and hand-placed DTensors, CPU + gloo.

The tests start their own 2 or 4 processes (``torch.multiprocessing`` spawn, a FileStore
rendezvous), each bounded by a time limit. Every worker checks its model against an unsharded
reference loaded in the same process, and that its report equals every other rank's.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import surgery
from surgery.cli import main as cli_main

from support import save_dcp, spawn

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")

TIMEOUT_S = 150


# --------------------------------------------------------------------------- models


class Body(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 23)  # 23 rows: uneven shards on 2 and 4 ranks
        self.norm = nn.LayerNorm(23)
        self.fc2 = nn.Linear(23, 24)
        self.gate = nn.Parameter(torch.randn(2, 24))  # 2 rows: empty shards on ranks 2, 3
        self.register_buffer("scale", torch.linspace(0.5, 1.5, 24))


class Net(nn.Module):
    """A body under ``prefix`` (``backbone`` in the checkpoint, ``encoder`` in the model)."""

    def __init__(self, classes: int, prefix: str, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        setattr(self, prefix, Body())
        self.head = nn.Linear(24, classes)
        for p in self.parameters():  # non-default values everywhere, LayerNorm included
            nn.init.uniform_(p, -1, 1)
        getattr(self, prefix).scale.uniform_(0, 2)


def fsdp(model: nn.Module, mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def by_hand(model: nn.Module, mesh) -> nn.Module:
    """Place every parameter with distribute_tensor: rows, columns (not one block) or whole."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    layout = {"fc2.weight": Shard(1), "norm.weight": Replicate(), "norm.bias": Replicate()}
    for mname, mod in model.named_modules():
        for pname, p in list(mod._parameters.items()):
            full = f"{mname}.{pname}".split(".", 1)[-1] if mname else pname
            placement = layout.get(full, Shard(0))
            dt = distribute_tensor(p.detach(), mesh, [placement])
            mod.register_parameter(pname, nn.Parameter(dt))
    return model


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
        for k, v in model.state_dict().items()
    }


def assert_states_equal(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def pad_head(name: str, ckpt: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """An adapter: keep the checkpoint's classes, zeros for the new ones."""
    out = torch.zeros(model.shape, dtype=model.dtype)
    out[: ckpt.shape[0]] = ckpt
    return out


# --------------------------------------------------------------------------- checkpoints


def write_checkpoints(rank: int, world: int, tmp: Path, mesh) -> dict[str, Path]:
    """A DCP folder saved from the sharded 4-class model, plus (rank 0) the same saved by one
    process, an HF-style sharded safetensors folder and one bf16 ``.pth`` file."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    paths = {"dcp": tmp / "dcp", "hf": tmp / "hf", "pth": tmp / "ckpt.pth", "dcp1": tmp / "dcp1"}
    src = fsdp(Net(4, "backbone", seed=0), mesh)
    dcp.save(src.state_dict(), checkpoint_id=paths["dcp"])
    sd = full_state(src)
    if rank == 0:
        # the same weights saved by one process: one chunk a tensor, each rank reads part of it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(sd, checkpoint_id=paths["dcp1"], no_dist=True)
        paths["hf"].mkdir()
        keys = sorted(sd)
        halves = {"model-00001-of-00002.safetensors": keys[::2]}
        halves["model-00002-of-00002.safetensors"] = keys[1::2]
        weight_map = {}
        for fname, ks in halves.items():
            save_file({k: sd[k].contiguous() for k in ks}, str(paths["hf"] / fname))
            weight_map.update(dict.fromkeys(ks, fname))
        index = {"metadata": {}, "weight_map": weight_map}
        (paths["hf"] / "model.safetensors.index.json").write_text(json.dumps(index))
        torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, paths["pth"])
    dist.barrier()
    return paths


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def load_and_compare(make, ckpt: Path, tmp: Path, tag: str, **kwargs) -> dict:
    """Load into a sharded model and into an unsharded reference; compare values and reports."""
    model = make()
    report = surgery.load_partial(model, ckpt, **kwargs)
    ref = Net(10, "encoder", seed=1)
    ref_report = surgery.load_partial(ref, ckpt, **kwargs)
    assert_states_equal(full_state(model), ref.state_dict(), tag)
    got, want = report.to_dict(), ref_report.to_dict()
    assert got == want, (tag, {k: (got[k], want[k]) for k in got if got[k] != want[k]})
    reports = gather(report.to_dict())
    assert all(r == reports[0] for r in reports), f"{tag}: reports differ across ranks"
    (tmp / f"report-{tag}-{dist.get_rank()}.json").write_text(json.dumps(report.to_dict()))
    return report.to_dict()


# --------------------------------------------------------------------------- worker cases


def case_fsdp(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    paths = write_checkpoints(rank, world, tmp, mesh)

    def make() -> nn.Module:
        return fsdp(Net(10, "encoder", seed=1), mesh)

    for tag in ("dcp", "dcp1", "hf", "pth"):
        r = load_and_compare(make, paths[tag], tmp, tag)
        assert sorted(m["key"] for m in r["mismatched"]) == ["head.bias", "head.weight"], tag
        assert r["prefix"] == ["backbone.", "encoder."], tag
        assert r["params_total"] == sum(p.numel() for p in Net(10, "encoder", 1).parameters())
        assert len(r["loaded"]) == 8 and bool(r["cast"]) == (tag == "pth"), tag
    # an adapter on a sharded target: computed at full size, then sharded
    r = load_and_compare(make, paths["dcp"], tmp, "adapted", on_mismatch=pad_head)
    assert sorted(m["key"] for m in r["adapted"]) == ["head.bias", "head.weight"]
    # plan_load, then apply_plan: the same load as load_partial, agreed the same way
    model, ref = make(), make()
    plan = surgery.plan_load(model, paths["hf"], on_mismatch=pad_head)
    report = surgery.apply_plan(model, plan)
    ref_report = surgery.load_partial(ref, paths["hf"], on_mismatch=pad_head)
    assert_states_equal(full_state(model), full_state(ref), "apply_plan")
    assert report.to_dict() == ref_report.to_dict() and len(report.adapted) == 2
    if world == 2:
        _errors(rank, world, make, paths)


def _errors(rank: int, world: int, make, paths: dict[str, Path]) -> None:
    model = make()
    before = full_state(model)
    # a planning error on rank 1 only: nobody writes, everybody raises the same error
    ckpt = paths["dcp"] if rank == 0 else paths["dcp"].parent / "missing.pth"
    with pytest.raises(surgery.DistributedError, match=r"failed on rank 1 of 2") as e:
        surgery.load_partial(model, ckpt)
    assert "CheckpointError" in str(e.value) and "missing.pth" in str(e.value)
    assert len(set(gather(str(e.value)))) == 1
    assert_states_equal(full_state(model), before, "after a failure on rank 1")
    # ranks that plan differently (rank 1 skips fc1): nobody writes
    skip = None if rank == 0 else "encoder.fc1.*"
    with pytest.raises(surgery.DistributedError, match="planned different loads"):
        surgery.load_partial(model, paths["hf"], skip=skip)
    assert_states_equal(full_state(model), before, "after differing plans")
    # strict on every rank: the planning error itself, naming the keys
    with pytest.raises(surgery.LoadError, match="strict=True") as e:
        surgery.load_partial(model, paths["dcp"], strict=True)
    assert "head.weight: checkpoint (4, 24) vs model (10, 24)" in str(e.value)
    assert not isinstance(e.value, surgery.DistributedError)
    assert_states_equal(full_state(model), before, "after a strict failure")
    # a dry run plans and agrees but writes nothing
    report = surgery.load_partial(model, paths["pth"], dry_run=True)
    assert report.dry_run and report.tensors_loaded == 7
    assert_states_equal(full_state(model), before, "after a dry run")
    _dcp_errors(rank, make, paths["dcp"])


def _dcp_errors(rank: int, make, folder: Path) -> None:
    """Broken copies of the 2-rank DCP folder: rank 1's data file missing or truncated, code
    in .metadata. Every rank checks every chunk before any rank writes, so every rank raises
    the same error and no shard changes (before, rank 0 wrote its shards, then failed)."""
    import pickle
    import shutil

    root = folder.parent
    marker = root / "PWNED"
    if rank == 0:
        for name in ("missing", "truncated", "payload"):
            shutil.copytree(folder, root / name)
        (root / "missing" / "__1_0.distcp").unlink()
        data = (root / "truncated" / "__1_0.distcp").read_bytes()
        (root / "truncated" / "__1_0.distcp").write_bytes(data[: len(data) // 2])
        md = pickle.loads((root / "payload" / ".metadata").read_bytes())
        md.storage_meta.checkpoint_id = _Payload(marker)
        (root / "payload" / ".metadata").write_bytes(pickle.dumps(md))
    dist.barrier()
    model = make()
    before = full_state(model)
    for name, error, match in [
        ("missing", surgery.CheckpointError, "__1_0.distcp' .*does not exist"),
        ("truncated", surgery.CheckpointError, "__1_0.distcp' has .* truncated"),
        ("payload", surgery.UnsafeCheckpointError, r"(posix|os)\.mkdir"),
    ]:
        with pytest.raises(error, match=match) as e:
            surgery.load_partial(model, root / name)
        assert not isinstance(e.value, surgery.DistributedError), name  # the same on every rank
        assert len(set(gather(str(e.value)))) == 1, name
        assert_states_equal(full_state(model), before, f"after the {name} folder")
    assert not marker.exists()


class _Payload:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):

        return (os.mkdir, (self.path,))


def case_by_hand(rank: int, world: int, tmp: Path) -> None:
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    paths = write_checkpoints(rank, world, tmp, mesh)

    def make() -> nn.Module:
        return by_hand(Net(10, "encoder", seed=1), mesh)

    for tag in ("dcp", "dcp1", "hf", "pth"):
        load_and_compare(make, paths[tag], tmp, tag)
    load_and_compare(make, paths["hf"], tmp, "adapted", on_mismatch=pad_head)


CASES = {"fsdp": case_fsdp, "by_hand": case_by_hand}


def run(case: str, world: int, tmp: Path, monkeypatch) -> None:
    """Run ``case`` on ``world`` spawned ranks; fail (killing them) if it takes too long."""
    spawn(CASES[case], world, tmp, monkeypatch, TIMEOUT_S)


# --------------------------------------------------------------------------- tests


@pytest.mark.distributed
def test_fsdp_two_ranks(tmp_path, monkeypatch):
    run("fsdp", 2, tmp_path, monkeypatch)
    for tag in ("dcp", "hf", "pth", "adapted"):
        reports = [json.loads((tmp_path / f"report-{tag}-{r}.json").read_text()) for r in (0, 1)]
        assert reports[0] == reports[1]


@pytest.mark.distributed
def test_distribute_tensor_by_hand_two_ranks(tmp_path, monkeypatch):
    run("by_hand", 2, tmp_path, monkeypatch)


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp_four_ranks(tmp_path, monkeypatch):
    run("fsdp", 4, tmp_path, monkeypatch)


# --------------------------------------------------------------------------- one process


def test_dcp_folder_into_plain_model(tmp_path):
    src = Net(4, "backbone", seed=0)
    save_dcp(src.state_dict(), tmp_path / "dcp")
    model = Net(10, "encoder", seed=1)
    head = model.head.weight.detach().clone()
    report = surgery.load_partial(model, tmp_path / "dcp")
    assert report.prefix == ("backbone.", "encoder.")
    assert [m.key for m in report.mismatched] == ["head.weight", "head.bias"]
    assert torch.equal(model.encoder.fc2.weight, src.backbone.fc2.weight)
    assert torch.equal(model.encoder.scale, src.backbone.scale)
    assert torch.equal(model.head.weight, head)


def test_dcp_training_checkpoint_unwrapped(tmp_path):
    """{'model': ..., 'optim': ...} saved with DCP: the model entry is picked, the rest noted."""
    src = Net(4, "encoder", seed=0)
    opt = torch.optim.AdamW(src.parameters())
    for p in src.parameters():
        p.grad = torch.ones_like(p)
    opt.step()  # optimizer tensors (exp_avg, ...) under 'optim.' in the same folder
    save_dcp({"model": src.state_dict(), "optim": opt.state_dict()}, tmp_path / "run")
    model = Net(4, "encoder", seed=1)
    report = surgery.load_partial(model, tmp_path / "run" / ".metadata", strict=True)
    assert report.tensors_loaded == report.tensors_total == 9
    assert torch.equal(model.head.bias, src.head.bias)
    source = surgery.sources.open_source(tmp_path / "run")
    assert source.container == ["model"] and source.other_entries == ["optim"]
    with pytest.raises(surgery.CheckpointError, match="no tensors under 'ema'"):
        surgery.sources.open_source(tmp_path / "run", entry="ema")


def test_inspect_dcp_folder(tmp_path, capsys):
    save_dcp(Net(4, "backbone", seed=0).state_dict(), tmp_path / "dcp")
    assert cli_main(["inspect", str(tmp_path / "dcp"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensors"] == 10  # 9 parameters and the scale buffer
    assert info["keys"]["head.weight"] == {"shape": [4, 24], "dtype": "float32"}
    assert info["keys"]["backbone.scale"] == {"shape": [24], "dtype": "float32"}
    assert info["bytes"] == 4 * sum(t.numel() for t in Net(4, "backbone", 0).state_dict().values())
    assert cli_main(["inspect", str(tmp_path / "dcp")]) == 0
    assert "backbone  [8 tensors" in capsys.readouterr().out


def test_region_read_reads_only_its_rows(tmp_path):
    """A Shard(0)-style block of rows comes straight from the file; a column block is cut."""
    from safetensors.torch import save_file

    t = torch.arange(7 * 5, dtype=torch.float32).reshape(7, 5)
    save_file({"w": t}, str(tmp_path / "w.safetensors"))
    torch.save({"w": t}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        source = surgery.sources.open_source(tmp_path / name)
        rows = torch.empty(3, 5, dtype=torch.float64)
        source.read_region_into("w", (4, 0), rows)
        assert torch.equal(rows, t[4:7].double())
        cols = torch.empty(7, 2)
        source.read_region_into("w", (0, 3), cols)
        assert torch.equal(cols, t[:, 3:5])
        source.close()


@pytest.mark.slow
@pytest.mark.distributed
def test_recipe_under_torchrun():
    """recipes/sharded_load.py as the README runs it: torchrun, 2 CPU ranks."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    out = subprocess.run(
        [*cmd, str(root / "recipes" / "sharded_load.py"), "--steps", "2"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env=env,
        cwd=root,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "replaced prefix 'backbone.' with 'encoder.' (6 keys)" in out.stdout
    assert "head.weight  checkpoint (4, 256) vs model (10, 256), not loaded" in out.stdout
    assert "report identical on all 2 ranks: True" in out.stdout
    assert "step 1: loss" in out.stdout
