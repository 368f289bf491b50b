"""Load a pretrained checkpoint into a sharded (FSDP2) model with a new head, on every rank.

A script to copy and change. Every rank builds the model, shards it with ``fully_shard`` (its
parameters become ``Shard(0)`` DTensors), and calls ``surgery.load_partial`` with the same
arguments. Each rank plans from the checkpoint's metadata, the ranks agree before anyone
writes, and each rank reads only its own shard of each tensor. The report is the same on every
rank and counts global parameters; rank 0 prints it. A few training steps follow, to show the
loaded model trains.

With no ``--ckpt`` it first makes its own "pretrained" checkpoint in a temporary folder: a
model with a ``backbone.`` and a 4-class head, sharded and saved with
``torch.distributed.checkpoint``. The model to fine-tune calls its body ``encoder.`` and has a
10-class head: the prefix is rewritten automatically and the head reported as mismatched.

Commands (from the repository root; CPU and gloo unless CUDA is there)::

    torchrun --nproc_per_node 2 recipes/sharded_load.py
    torchrun --nproc_per_node 4 recipes/sharded_load.py --steps 20
    torchrun --nproc_per_node 2 recipes/sharded_load.py --ckpt runs/step-1000 --entry model
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

import surgery


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already says it or there is
    none to show (None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None:
            return text
        return super()._get_help_string(action)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], add_help=add_help, formatter_class=HelpFormatter
    )
    parser.add_argument(
        "--ckpt",
        help="checkpoint: DCP folder, safetensors, .pth; default: make one (a 4-class model "
        "saved with torch.distributed.checkpoint in a temporary folder)",
    )
    parser.add_argument(
        "--entry",
        help="entry holding the model in the checkpoint, e.g. 'model'; default: found by "
        "surgery.load_partial",
    )
    parser.add_argument("--classes", type=int, default=10, help="classes of the new head")
    parser.add_argument("--width", type=int, default=256, help="hidden width of the model")
    parser.add_argument("--steps", type=int, default=5, help="training steps after the load")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate")
    parser.add_argument(
        "--seed", type=int, default=0, help="seeds the new model and the random training data"
    )
    return parser


class Body(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, width)
        self.norm = nn.LayerNorm(width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc2(torch.relu(self.norm(self.fc1(x)))))


class Classifier(nn.Module):
    """A body (named ``body_name``) and a linear head."""

    def __init__(self, width: int, classes: int, body_name: str = "encoder") -> None:
        super().__init__()
        self.body_name = body_name
        setattr(self, body_name, Body(width))
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, self.body_name)(x))


def shard(model: nn.Module, mesh) -> nn.Module:
    """FSDP2: each Linear is its own unit, then the root."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            fully_shard(m, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def make_pretrained(folder: str, width: int, mesh) -> str:
    """A stand-in for a pretrained run: 4 classes, body called ``backbone``, saved with DCP."""
    torch.manual_seed(1234)
    model = shard(Classifier(width, 4, body_name="backbone"), mesh)
    path = os.path.join(folder, "pretrained")
    dcp.save(model.state_dict(), checkpoint_id=path)
    return path


def main(argv: list[str] | None = None) -> None:
    args = get_args_parser().parse_args(argv)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = "cuda" if backend == "nccl" else "cpu"
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    mesh = init_device_mesh(device, (world,))
    if rank == 0:
        print(f"args: {vars(args)}; {world} ranks, {backend}")

    with tempfile.TemporaryDirectory() as tmp:
        # One folder for every rank: rank 0's temporary folder, sent to the others.
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        ckpt = args.ckpt or make_pretrained(shared[0], args.width, mesh)

        torch.manual_seed(args.seed)
        model = shard(Classifier(args.width, args.classes).to(device), mesh)
        report = surgery.load_partial(model, ckpt, entry=args.entry)
        if rank == 0:
            print(report)
        # Same report on every rank, counting global parameters.
        reports = [None] * world
        dist.all_gather_object(reports, report.to_dict())
        if rank == 0:
            same = all(r == reports[0] for r in reports)
            print(f"report identical on all {world} ranks: {same}")
        dist.barrier()  # rank 0 removes the folder on leaving this block

    # A few steps on random data: the loaded, sharded model trains as usual.
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(args.seed + rank)
    for step in range(args.steps):
        x = torch.randn(16, 32, generator=gen).to(device)
        y = torch.randint(0, args.classes, (16,), generator=gen).to(device)
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0:
            print(f"step {step}: loss {loss.item():.4f}")
    # Leave together: once every rank passed the barrier, no collective is still running on
    # gloo's worker threads, which would otherwise release its tensors while the interpreter
    # exits and abort it (pytorch#190489).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
