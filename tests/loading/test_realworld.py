"""Checkpoints as people have them, written by the real libraries (issue 10).

Ties the planner must not break silently (two encoders in one file), and the folders and
files that transformers, accelerate, Lightning, timm and TorchScript write.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

import surgery
from surgery import PrefixTieError

from support import SmallCNN, assert_same_state, snapshot


def _moco(seed: int = 0) -> tuple[dict[str, torch.Tensor], SmallCNN, SmallCNN]:
    """A MoCo-style checkpoint: a query and a key encoder of the same architecture, DDP-wrapped."""
    torch.manual_seed(seed)
    q, k = SmallCNN(), SmallCNN()
    sd = {f"module.encoder_q.{n}": t for n, t in q.state_dict().items()}
    sd.update({f"module.encoder_k.{n}": t for n, t in k.state_dict().items()})
    sd["module.queue"] = torch.randn(16, 8)
    return sd, q, k


def test_two_equally_good_prefixes_refuse_in_pth_and_safetensors(tmp_path):
    sd, q, k = _moco()
    torch.save(sd, tmp_path / "moco.pth")
    save_file(sd, tmp_path / "moco.safetensors")  # sorted keys: encoder_k comes first here
    model = SmallCNN()
    before = snapshot(model)
    for name in ("moco.pth", "moco.safetensors"):
        with pytest.raises(PrefixTieError) as err:
            surgery.load_partial(model, tmp_path / name)
        msg = str(err.value)
        assert "module.encoder_q." in msg and "module.encoder_k." in msg
        assert 'remap=[(r"^module\\.encoder_q\\.", "")]' in msg
        assert "prefix=None" in msg
        assert_same_state(model, before)
    # The remap the message offers picks each encoder, whatever the file's key order.
    for name in ("moco.pth", "moco.safetensors"):
        for which, src in (("q", q), ("k", k)):
            model = SmallCNN()
            surgery.load_partial(
                model, tmp_path / name, remap=[(rf"^module\.encoder_{which}\.", "")]
            )
            assert_same_state(model, snapshot(src))


def test_model_and_ema_prefixes_of_different_length_tie():
    torch.manual_seed(1)
    live, ema = SmallCNN(), SmallCNN()
    sd = {f"model.{n}": t for n, t in live.state_dict().items()}
    sd.update({f"model_ema.{n}": t for n, t in ema.state_dict().items()})
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(PrefixTieError, match=r"'model\.'.*\n.*'model_ema\.'"):
        surgery.load_partial(model, sd)
    assert_same_state(model, before)
    surgery.load_partial(model, sd, remap=[(r"^model_ema\.", "")])
    assert_same_state(model, snapshot(ema))


def test_equivalent_rewrites_are_no_tie():
    # 'net.body.' -> 'body.' and 'net.' -> '' pair the same keys: one reading, no error.
    torch.manual_seed(2)
    src = torch.nn.Sequential()
    src.add_module("body", SmallCNN())
    sd = {f"net.{n}": t for n, t in src.state_dict().items()}
    model = torch.nn.Sequential()
    model.add_module("body", SmallCNN())
    report = surgery.load_partial(model, sd)
    assert len(report.loaded) == len(sd)
    assert_same_state(model, snapshot(src))


# --- folders -----------------------------------------------------------------------------


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=32, n_positions=16)
    cfg.bos_token_id = cfg.eos_token_id = 0
    return GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module")
def trainer_folder(tmp_path_factory):
    """A real transformers Trainer checkpoint folder (one step, CPU) and the trained model."""
    from transformers import Trainer, TrainingArguments

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            x = torch.arange(8) % 32
            return {"input_ids": x, "labels": x}

    torch.manual_seed(3)
    model = _tiny_gpt2()
    out = tmp_path_factory.mktemp("trainer")
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=1,
        save_steps=1,
        report_to=[],
        use_cpu=True,
        per_device_train_batch_size=2,
        disable_tqdm=True,
    )
    Trainer(model=model, args=args, train_dataset=Tokens()).train()
    return out / "checkpoint-1", model


def _gpt2_values_land(folder, trained):
    model = _tiny_gpt2()
    report = surgery.load_partial(model, folder, strict=True)
    assert report.ok and len(report.loaded) > 0
    assert_same_state(model, snapshot(trained))


def test_trainer_folder_picks_model_safetensors(trainer_folder):
    folder, trained = trainer_folder
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names
    assert "training_args.bin" in names
    _gpt2_values_land(folder, trained)


def test_old_trainer_folders_pick_pytorch_model_bin_and_indexes(trainer_folder, tmp_path):
    import shutil

    src, trained = trainer_folder
    old = tmp_path / "old"
    shutil.copytree(src, old)
    (old / "model.safetensors").unlink()
    torch.save(trained.state_dict(), old / "pytorch_model.bin")  # the pre-safetensors name
    _gpt2_values_land(old, trained)
    (old / "scheduler.pt").unlink()  # once picked optimizer.pt silently
    _gpt2_values_land(old, trained)
    for safe in (True, False):  # sharded, with an index, beside the training state
        sharded = tmp_path / f"sharded{safe}"
        shutil.copytree(src, sharded)
        (sharded / "model.safetensors").unlink()
        trained.save_pretrained(sharded, max_shard_size="2KB", safe_serialization=safe)
        assert any(p.name.endswith(".index.json") for p in sharded.iterdir())
        _gpt2_values_land(sharded, trained)
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(src / "optimizer.pt", bare)
    model = _tiny_gpt2()
    before = snapshot(model)
    with pytest.raises(surgery.CheckpointError, match=r"training state \(optimizer\.pt\)"):
        surgery.load_partial(model, bare)
    assert_same_state(model, before)


def test_accelerate_save_state_folder(tmp_path):
    from accelerate import Accelerator

    torch.manual_seed(4)
    acc = Accelerator(cpu=True)
    net = SmallCNN()
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    net, opt = acc.prepare(net, opt)
    acc.save_state(str(tmp_path / "state"))
    names = {p.name for p in (tmp_path / "state").iterdir()}
    assert "optimizer.bin" in names and any(n.startswith("random_states_") for n in names)
    model = SmallCNN()
    surgery.load_partial(model, tmp_path / "state", strict=True)
    assert_same_state(model, snapshot(acc.unwrap_model(net)))


def test_trainer_folder_restores_optimizer_and_scheduler(trainer_folder, tmp_path):
    """restore_optimizer / restore_scheduler on a real Trainer folder pick optimizer.pt and
    scheduler.pt (they once said the folder "does not exist")."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    folder, _ = trainer_folder
    model = _tiny_gpt2()
    # The Trainer's own parameter order (decayed, then not): oracle for the positions' names.
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    reference = Trainer(model=model, args=args).create_optimizer()
    name_of = {id(p): n for n, p in model.named_parameters()}
    order = [name_of[id(p)] for g in reference.param_groups for p in g["params"]]
    saved = torch.load(folder / "optimizer.pt", weights_only=True)

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    with pytest.raises(surgery.OptimizerStateError, match="Pass names="):
        surgery.restore_optimizer(opt, model, folder)  # positional, no names: asked for
    report = surgery.restore_optimizer(opt, model, folder, names=order)
    assert report.source == str(folder / "optimizer.pt") and report.ok
    params = dict(model.named_parameters())
    for pos, name in enumerate(order):
        for k, v in saved["state"][pos].items():
            assert torch.equal(opt.state[params[name]][k], v), (name, k)

    sched = get_linear_schedule_with_warmup(opt, 0, 4)
    assert surgery.restore_scheduler(sched, folder) == 1
    ref_opt = torch.optim.AdamW(_tiny_gpt2().parameters(), lr=1e-4)
    ref = get_linear_schedule_with_warmup(ref_opt, 0, 4)
    ref_opt.step()
    ref.step()
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]


def test_accelerate_folder_restores_optimizer(tmp_path):
    from accelerate import Accelerator

    torch.manual_seed(6)
    acc = Accelerator(cpu=True)
    net = SmallCNN()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net, opt = acc.prepare(net, opt)
    acc.backward(net(torch.randn(2, 3, 4, 4)).sum())
    opt.step()
    acc.save_state(str(tmp_path / "state"))
    saved = torch.load(tmp_path / "state" / "optimizer.bin", weights_only=True)

    model = SmallCNN()
    new_opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # names from a model of the same architecture: the optimizer held its parameters in order
    report = surgery.restore_optimizer(new_opt, model, tmp_path / "state", names=SmallCNN())
    assert report.source == str(tmp_path / "state" / "optimizer.bin")
    for pos, p in enumerate(model.parameters()):
        assert torch.equal(
            new_opt.state[p]["momentum_buffer"], saved["state"][pos]["momentum_buffer"]
        )


def test_lightning_checkpoints_folder_asks_which(tmp_path):
    import lightning as L

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN()

        def training_step(self, batch, i):
            return self.net(batch[0]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(5)
    module = Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(2, 3, 4, 4)))
    ckpt_cb = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "checkpoints", save_last=True)
    trainer = L.Trainer(
        max_steps=1,
        enable_progress_bar=False,
        logger=False,
        enable_model_summary=False,
        callbacks=[ckpt_cb],
        accelerator="cpu",
    )
    trainer.fit(module, data)
    folder = tmp_path / "checkpoints"
    names = sorted(p.name for p in folder.iterdir())
    assert "last.ckpt" in names and any(n.startswith("epoch=") for n in names)
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(surgery.CheckpointError) as err:
        surgery.load_partial(model, folder, remap=[(r"^net\.", "")])
    for n in names:
        assert n in str(err.value)
    assert "'last.ckpt' is the latest" in str(err.value)
    assert_same_state(model, before)
    surgery.load_partial(model, folder / "last.ckpt", remap=[(r"^net\.", "")], strict=True)
    assert_same_state(model, snapshot(module.net))


# --- files ---------------------------------------------------------------------------------


def test_torchscript_archive_is_named_and_loads_when_trusted(tmp_path):
    torch.manual_seed(6)
    src = SmallCNN()
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(src), str(path))
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(surgery.UnsafeCheckpointError) as err:
        surgery.load_partial(model, path)
    msg = str(err.value)
    assert "TorchScript" in msg and "trust_pickle=True" in msg
    assert "torch.jit.load(path).state_dict()" in msg
    assert "truncated" not in msg and "corrupt" not in msg
    assert_same_state(model, before)
    report = surgery.load_partial(model, path, trust_pickle=True, strict=True)
    assert report.ok
    assert_same_state(model, snapshot(src))


def test_timm_training_checkpoint_with_namespace_args_loads_without_trust(tmp_path):
    import argparse

    import timm
    from timm.utils import CheckpointSaver

    torch.manual_seed(7)
    src = timm.create_model("resnet10t", num_classes=5)
    opt = torch.optim.SGD(src.parameters(), lr=0.1)
    args = argparse.Namespace(model="resnet10t", lr=0.1, epochs=1)
    saver = CheckpointSaver(
        src, opt, args=args, checkpoint_dir=str(tmp_path), recovery_dir=str(tmp_path)
    )
    saver.save_checkpoint(0, metric=0.5)
    model = timm.create_model("resnet10t", num_classes=5)
    report = surgery.load_partial(model, tmp_path / "last.pth.tar", strict=True)
    assert report.ok
    assert_same_state(model, snapshot(src))
    # Allowed for that load only, not registered for the whole process.
    assert argparse.Namespace not in torch.serialization.get_safe_globals()

    class Custom:  # anything else is not read: beside the weights it is skipped, and said
        pass

    globals()["Custom"] = Custom
    Custom.__module__, Custom.__qualname__ = __name__, "Custom"
    torch.save({"state_dict": src.state_dict(), "args": Custom()}, tmp_path / "other.pth")
    fresh = timm.create_model("resnet10t", num_classes=5)
    report = surgery.load_partial(fresh, tmp_path / "other.pth", strict=True)
    assert_same_state(fresh, snapshot(src))
    assert any("'args'" in n and f"{__name__}.Custom" in n for n in report.notes)
    # Inside the state dict it is refused, naming it.
    sd = {**src.state_dict(), "extra": Custom()}
    torch.save({"state_dict": sd}, tmp_path / "inside.pth")
    fresh = timm.create_model("resnet10t", num_classes=5)
    before = snapshot(fresh)
    with pytest.raises(surgery.UnsafeCheckpointError, match="Custom"):
        surgery.load_partial(fresh, tmp_path / "inside.pth")
    assert_same_state(fresh, before)


def _linear_gpt2():
    """GPT-2 with every Conv1D replaced by the nn.Linear a port would write (same names)."""
    from transformers.pytorch_utils import Conv1D

    model = _tiny_gpt2()
    for name, module in list(model.named_modules()):
        if isinstance(module, Conv1D):
            n_in, n_out = module.weight.shape
            parent, _, child = name.rpartition(".")
            model.get_submodule(parent).add_module(child, torch.nn.Linear(n_in, n_out))
    return model.eval()


def test_gpt2_conv1d_square_weights_are_noted_and_the_fix_works():
    from surgery.adapters import transpose_linear, transposed

    torch.manual_seed(8)
    gpt2 = _tiny_gpt2().eval()
    sd = gpt2.state_dict()
    model = _linear_gpt2()
    report = surgery.load_partial(model, sd, on_mismatch=transpose_linear)
    notes = " ".join(report.notes)
    assert "Conv1D" in notes and "transformer.h.0.attn.c_proj.weight" in notes
    assert "surgery.adapters.transposed" in notes
    square = [k for k, v in sd.items() if k.endswith("c_proj.weight") and v.shape[0] == v.shape[1]]
    assert square and all(k in notes for k in square)
    ids = torch.arange(8)[None]
    # As loaded, the square weights are silently wrong: the outputs differ.
    assert not torch.allclose(model(ids).logits, gpt2(ids).logits, atol=1e-5)
    # The fix the note offers gives GPT-2's outputs exactly.
    fixed = _linear_gpt2()
    report = surgery.load_partial(fixed, transposed(sd, square), on_mismatch=transpose_linear)
    torch.testing.assert_close(fixed(ids).logits, gpt2(ids).logits)
    # Into GPT-2's own Conv1D there is nothing to say.
    assert not any("Conv1D" in n for n in surgery.load_partial(_tiny_gpt2(), sd).notes)


def test_two_container_entries_with_different_weights_ask(tmp_path):
    torch.manual_seed(9)
    a, b = SmallCNN(), SmallCNN()
    torch.save({"model": a.state_dict(), "state_dict": b.state_dict()}, tmp_path / "two.pth")
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(surgery.CheckpointError, match=r"'state_dict' \(16 tensors\).*'model'"):
        surgery.load_partial(model, tmp_path / "two.pth")
    assert_same_state(model, before)
    surgery.load_partial(model, tmp_path / "two.pth", entry="model")
    assert_same_state(model, snapshot(a))
    # One state dict saved under two names is one reading: it loads.
    sd = b.state_dict()
    torch.save({"model": sd, "state_dict": sd}, tmp_path / "same.pth")
    surgery.load_partial(model, tmp_path / "same.pth")
    assert_same_state(model, snapshot(b))


def test_folder_with_files_of_different_names_asks_whatever_their_format(tmp_path):
    torch.manual_seed(10)
    live, ema = SmallCNN(), SmallCNN()
    save_file(live.state_dict(), tmp_path / "weights.safetensors")
    torch.save(ema.state_dict(), tmp_path / "ema.pth")  # once: safetensors won, unsaid
    model = SmallCNN()
    before = snapshot(model)
    with pytest.raises(surgery.CheckpointError, match=r"several checkpoints \(ema.pth, weights"):
        surgery.load_partial(model, tmp_path)
    assert_same_state(model, before)
    (tmp_path / "ema.pth").unlink()
    torch.save(live.state_dict(), tmp_path / "weights.pth")  # one model, two formats: fine
    surgery.load_partial(model, tmp_path, strict=True)
    assert_same_state(model, snapshot(live))


def test_dcp_folder_loads(tmp_path):
    """A torch.distributed.checkpoint folder (dcp.save on one process) loads like a file,
    from the folder or its .metadata file; a wrong head is reported, the rest copied."""
    import torch.distributed.checkpoint as dcp

    src = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    dcp.save(src.state_dict(), checkpoint_id=str(tmp_path / "dcp"))
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 4))
    head = model[1].weight.detach().clone()
    report = surgery.load_partial(model, tmp_path / "dcp")
    assert report.loaded == ["0.weight", "0.bias"]
    assert [m.key for m in report.mismatched] == ["1.weight", "1.bias"]
    assert torch.equal(model[0].weight, src[0].weight) and torch.equal(model[1].weight, head)
    same = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 2))
    surgery.load_partial(same, tmp_path / "dcp" / ".metadata", strict=True)
    assert all(
        torch.equal(a, b)
        for a, b in zip(same.state_dict().values(), src.state_dict().values(), strict=True)
    )
