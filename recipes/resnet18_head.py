"""Fine-tune a pretrained ResNet-18 with a new head: the whole transfer-learning story.

Read a checkpoint, replace the head, load what fits (and print what happened), freeze, build
optimizer parameter groups, train, evaluate in ``model.eval()`` under ``torch.no_grad()``, save
the fine-tuned weights as safetensors. A script to copy and change, not a framework.

With no arguments it runs a built-in demo that needs no download (several minutes on one CPU
thread): it pretrains a ResNet-18 on scikit-learn's handwritten digits 0-4, saves that
checkpoint the way a multi-GPU training script does (``module.`` keys inside
``{'epoch', 'state_dict', 'optimizer'}``), then transfers it to digits 5-9 with 10 labelled
images per class and compares training from scratch, training a new head only, and full
fine-tuning with parameter groups, on 746 other images of 5-9 (chance: 0.2). Seed 0 gave
0.366 / 0.534 / 0.611 (320 s of CPU time on the project's shared machine).

The demo runs on one thread unless --threads says otherwise: then a seed gives the same
numbers and byte-identical weights run after run. More threads, another CPU (its vector
instruction set picks other kernels) or another torch version sum in another order, and
training turns those last-bit differences into other accuracies: compare the margins.

Commands (from the repository root, with surgery installed, e.g. by ``make demo``)::

    python recipes/resnet18_head.py                   # the demo
    python recipes/resnet18_head.py --seed 1          # the demo, another seed
    python recipes/resnet18_head.py --quick           # the demo's plumbing, in runs/quick
    python recipes/resnet18_head.py --resume          # ... the pretraining AdamW state kept too

    # Your data: an ImageFolder (DATA/<class>/*.jpg, or DATA/train/<class> and DATA/val/<class>)
    python recipes/resnet18_head.py --weights torchvision --data DATA --freeze head-only
    python recipes/resnet18_head.py --weights timm:resnet18.a1_in1k --data DATA --freeze none
    python recipes/resnet18_head.py --weights runs/last.pth --data DATA \\
        --freeze conv1,bn1,layer1,layer2 --epochs 10 --lr 1e-3 --out runs/resnet18_ft.safetensors
    python recipes/resnet18_head.py --weights last.pth --data DATA \\
        --allow-global omegaconf.dictconfig.DictConfig    # a config class saved with the weights
    python recipes/resnet18_head.py --help                # every option, with its default
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

import surgery

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default after its help, unless the help already says it (defaults
    that depend on the mode) or there is none to show (None, a flag's False, an empty list)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is False or default == []:
            return text
        return super()._get_help_string(action)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Fine-tune a pretrained ResNet-18 with a new head (no arguments: the demo).",
        add_help=add_help,
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--weights",
        default=None,
        help="a checkpoint path (.pth/.pt/.safetensors/...), 'torchvision' for "
        "ResNet18_Weights.IMAGENET1K_V1, or a hub name: 'timm:NAME', 'hf-hub:ORG/NAME', "
        "'torchvision:ENUM' (cached; HF_HUB_OFFLINE=1 never downloads); default: the demo's "
        "own checkpoint",
    )
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="--weights may hold pickled Python objects (a whole saved model): unpickling runs "
        "code, so only for files you trust",
    )
    parser.add_argument(
        "--allow-global",
        action="append",
        default=[],
        metavar="MODULE.NAME",
        help="let safe loading of --weights read objects of this class (repeatable), e.g. "
        "omegaconf.dictconfig.DictConfig in saved hyper-parameters; for plain data you trust, "
        "nothing else in the file runs (surgery.load_partial(allow_globals=[...]))",
    )
    parser.add_argument(
        "--data",
        default=None,
        help="an ImageFolder-style folder; its classes set the new head. With DATA/train and "
        "DATA/val those are used, otherwise a seeded --val-fraction of DATA is held out; "
        "default: the demo's digits",
    )
    parser.add_argument(
        "--freeze",
        default="head-only",
        help="'head-only' (train the new fc only), 'none', or module selectors to freeze, "
        "e.g. 'conv1,bn1,layer1,layer2' (--data; the demo runs its own three variants)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="passes over the training images; default: 30 (demo), 2 (--quick), 10 (--data)",
    )
    parser.add_argument(
        "--lr", type=float, default=1e-2, help="peak learning rate of the new head (fc)"
    )
    parser.add_argument(
        "--layer-decay",
        type=float,
        default=0.3,
        help="pretrained blocks train slower the earlier they are: layer4 at lr * 0.3, "
        "layer3 at lr * 0.3**2, ... (surgery.param_groups(layer_decay=...))",
    )
    parser.add_argument(
        "--weight-decay",
        type=float,
        default=0.05,
        help="AdamW weight decay of weights; biases and norm layers get none",
    )
    parser.add_argument("--batch-size", type=int, default=16, help="training images per step")
    parser.add_argument(
        "--out",
        default=None,
        help="where the fine-tuned weights are saved (safetensors); default: "
        "WORKDIR/finetuned.safetensors (demo), runs/finetune/finetuned.safetensors (--data)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds the data split, the new head and the batch order (the demo's data too)",
    )
    parser.add_argument(
        "--device", default=None, help="default: cpu (demo), cuda if available (--data)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads; default: 1 for the demo (reproducible: more threads sum in "
        "an order that can vary from run to run), torch's default for --data",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="also restore the optimizer state saved in the --weights checkpoint (in the demo: "
        "the pretraining AdamW's): each moment follows its weight by name into the new groups, "
        "the new head and the frozen layers start fresh (surgery.restore_optimizer)",
    )
    data = parser.add_argument_group("your data (--weights and --data)")
    data.add_argument("--image-size", type=int, default=224, help="train crop size in pixels")
    data.add_argument(
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of a one-folder DATA held out for validation, seeded, each class keeping "
        "an image to train on; 0 trains on every image without validation (DATA/train and "
        "DATA/val ignore it)",
    )
    data.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    demo = parser.add_argument_group("demo (no --weights/--data)")
    demo.add_argument(
        "--workdir",
        default=None,
        help="where the demo saves its checkpoints; default: runs/resnet18_head, runs/quick "
        "with --quick (so a smoke run never overwrites the full demo's files)",
    )
    demo.add_argument("--shots", type=int, default=10, help="labelled images per new class")
    demo.add_argument(
        "--pretrain-epochs",
        type=int,
        default=20,
        help="epochs of pretraining on digits 0-4 (1 with --quick)",
    )
    demo.add_argument(
        "--scratch-lr", type=float, default=1e-3, help="the from-scratch row: lr of every layer"
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 256 images to pretrain on for 1 epoch, 2 transfer epochs, 256 to "
        "test on",
    )
    return parser


# --------------------------------------------------------------------------- training


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(model, loader, optimizer, *, epochs, device, desc, val_loader=None) -> float:
    """Cross-entropy training with a one-cycle schedule (warm-up, then cosine decay); returns
    the last epoch's mean train loss.

    Prints one plain line per epoch (mean train loss, validation accuracy), so a log file or
    a CI job sees the progress too; the tqdm bar shows only on a terminal.
    """
    steps = epochs * len(loader)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=steps,
        pct_start=0.15,
    )
    width = len(str(epochs))
    with tqdm(total=steps, desc=desc, unit="step", disable=None, leave=False) as bar:
        for epoch in range(1, epochs + 1):
            model.train()  # frozen BatchNorm layers stay in eval mode: surgery.freeze holds them
            start, loss_sum, seen = time.perf_counter(), 0.0, 0
            for images, targets in loader:
                loss = F.cross_entropy(model(images.to(device)), targets.to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.item() * len(targets)
                seen += len(targets)
                bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
                bar.update()
            line = f"{desc} epoch {epoch:>{width}}/{epochs}  train loss {loss_sum / seen:.3f}"
            if val_loader is not None:
                line += f"  val acc {evaluate(model, val_loader, device=device):.3f}"
            tqdm.write(f"{line}  ({time.perf_counter() - start:.1f}s)")
    return loss_sum / seen


def evaluate(model, loader, *, device) -> float:
    """Top-1 accuracy."""
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for images, targets in loader:
            predicted = model(images.to(device)).argmax(1).cpu()
            correct += (predicted == targets).sum().item()
            total += len(targets)
    return correct / total


def fine_tune(model, weights, train_loader, test_loader, args, *, freeze, desc, val_loader=None):
    """Load what fits, freeze, build parameter groups, train, evaluate; returns the accuracy on
    ``test_loader`` (None without one) and the last epoch's mean train loss.

    ``weights``: what ``surgery.load_partial`` takes (a path, a state dict), or None to train
    from scratch. ``val_loader``: evaluated after every epoch, for the printed progress only.
    """
    if weights is not None:
        # The head is new: skip the old one explicitly, even where its shape happens to fit
        # (here 5 classes -> 5 classes); other shape mismatches would be skipped and reported.
        report = surgery.load_partial(
            model,
            weights,
            skip="fc.*",
            trust_pickle=args.trust_pickle,
            allow_globals=args.allow_global,
        )
        print(report)
        report.assert_loaded(allow_missing=["fc.*"])  # anything else missing is an error
    if freeze == "head-only":
        print(surgery.freeze_except(model, "fc"))  # BatchNorm statistics stay fixed
    elif freeze == "none":
        print(f"freeze: none, all {sum(p.numel() for p in model.parameters()):,} params train")
    else:
        print(surgery.freeze(model, *freeze))
    if weights is None:  # from scratch: one learning rate for every layer
        groups = surgery.param_groups(model, lr=args.scratch_lr, weight_decay=args.weight_decay)
    else:  # the new head learns fast, pretrained blocks slower the earlier they are
        groups = surgery.param_groups(
            model, lr=args.lr, weight_decay=args.weight_decay, layer_decay=args.layer_decay
        )
    print(surgery.describe_groups(groups))
    optimizer = torch.optim.AdamW(groups)
    if args.resume and weights is not None:
        resume_optimizer(optimizer, model, weights, args)
    loss = train(
        model,
        train_loader,
        optimizer,
        epochs=args.epochs,
        device=args.device,
        desc=desc,
        val_loader=val_loader,
    )
    return (None if test_loader is None else evaluate(model, test_loader, device=args.device)), loss


def resume_optimizer(optimizer, model, checkpoint, args) -> surgery.OptimizerReport:
    """--resume: give the new optimizer the saved optimizer's state, by parameter name.

    Positional state (``optimizer.state_dict()``) is named from the checkpoint's own weights;
    the ``module.`` prefix is dropped as for the weights. The head is new even where its shape
    fits, so its old moments are skipped.
    """
    if not isinstance(checkpoint, (str, Path)):
        raise RecipeError("--resume needs --weights to be a checkpoint file with optimizer state")
    report = surgery.restore_optimizer(
        optimizer,
        model,
        checkpoint,
        skip="fc",
        trust_pickle=args.trust_pickle,
        allow_globals=args.allow_global,
    )
    print(report)
    return report


def save_weights(model: nn.Module, path: str | Path, classes: list[str]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, path, metadata={"classes": json.dumps(classes), "arch": "resnet18"})
    print(f"saved the fine-tuned weights to {path}")


# --------------------------------------------------------------------------- your data


class RecipeError(Exception):
    """A problem with the arguments, the data or the environment, said in one line with the fix."""


class UnreadableImage(RecipeError):
    """An image file PIL cannot read, named by its path.

    Raised while loading, also in a DataLoader worker: the main process then re-raises it as
    ``UnreadableImage(<the worker's traceback text>)``, whose last line is the message.
    """

    def __init__(self, message: str) -> None:
        last = message.strip().splitlines()[-1] if message.strip() else message
        super().__init__(last.split("UnreadableImage: ", 1)[-1])


def read_image(path: str):
    """torchvision's PIL loader, failing with the path of a corrupt or truncated image."""
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:  # corrupt, truncated, not an image
        why = "not an image PIL knows" if isinstance(e, UnidentifiedImageError) else str(e)
        raise UnreadableImage(
            f"--data: cannot read the image {path} ({why}); delete or replace that file"
        ) from None


HUB_PREFIXES = ("torchvision:", "timm:", "hf-hub:")


def load_weights(spec: str, args):
    """--weights -> what load_partial takes. Hub names (torchvision, timm:NAME, hf-hub:ORG/NAME)
    download once into their library's cache; offline, the error names the cached path."""
    name = "torchvision:ResNet18_Weights.IMAGENET1K_V1" if spec == "torchvision" else spec
    hub = name.startswith(HUB_PREFIXES)
    if not hub and not Path(spec).exists():
        raise RecipeError(
            f"--weights {spec}: no such file. Pass a checkpoint file (.pth, .pt, .bin, "
            ".safetensors, a sharded *.index.json), 'torchvision', 'timm:NAME' or 'hf-hub:ORG/NAME'"
        )
    # Lazy (memory-mapped), any checkpoint form; hub names resolve to their cached file.
    try:
        state = surgery.read_checkpoint(
            name, trust_pickle=args.trust_pickle, allow_globals=args.allow_global
        )
    except surgery.CheckpointError as e:
        if not hub:
            raise
        raise RecipeError(f"--weights {spec}: {hub_advice(str(e), name)}") from None
    heads = {k: tuple(v.shape) for k, v in state.items() if re.search(r"(^|\.)fc\.weight$", k)}
    print(f"read {spec}: {len(state)} tensors, old head {heads or 'none'}")
    return name  # load_partial streams from the file and names it in its report


def hub_advice(message: str, name: str) -> str:
    """The library's text for a hub name it could not get, saying each thing once: the name is
    already in front (``--weights NAME:``), and the local copy is an option here."""
    fix = "pass a local copy as --weights PATH"
    message, found = re.subn(
        r"or pass the path of a local copy instead of .*$", "or " + fix, message
    )
    if not found:
        message = f"{message.rstrip('. ')}; or {fix}"
    message = message.replace(". or " + fix, ". Or " + fix)
    message = re.sub(rf"^{re.escape(repr(name))} (is )?", "", message)
    return message.replace(f" {name!r}", " it")


def image_folders(args, train_tf, eval_tf):
    """(train set, validation set or None, classes) from ``--data``; one line per problem."""
    root = Path(args.data)
    if not root.is_dir():
        raise RecipeError(
            f"--data {root}: no such folder. Pass an ImageFolder: DATA/<class>/*.jpg, or "
            "DATA/train/<class>/*.jpg and DATA/val/<class>/*.jpg"
        )

    def ImageFolder(folder, transform):
        try:
            return torchvision.datasets.ImageFolder(folder, transform, loader=read_image)
        except (FileNotFoundError, OSError) as e:  # no class folders, or no images in them
            raise RecipeError(
                f"--data {folder}: {str(e).rstrip('.')}. An ImageFolder holds one folder of "
                "images per class"
            ) from None

    if (root / "train").is_dir() and (root / "val").is_dir():
        train_set = ImageFolder(root / "train", train_tf)
        val_set = ImageFolder(root / "val", eval_tf)
        if val_set.classes != train_set.classes:
            raise RecipeError(f"--data {root}: {class_difference(train_set, val_set)}")
        check_classes(root, train_set.classes)
        return train_set, val_set, train_set.classes
    # one folder: hold out a seeded fraction, seen without augmentation
    full_train, full_eval = ImageFolder(root, train_tf), ImageFolder(root, eval_tf)
    check_classes(root, full_train.classes)
    train_idx, val_idx = split(full_train.targets, full_train.classes, args.val_fraction, args.seed)
    val_set = Subset(full_eval, val_idx) if val_idx else None
    return Subset(full_train, train_idx), val_set, full_train.classes


def check_classes(root: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise RecipeError(
            f"--data {root}: one class folder ({classes[0]!r}); a classifier needs at least 2"
        )


def class_difference(train_set, val_set) -> str:
    def listed(names):
        shown = ", ".join(repr(c) for c in names[:5])
        return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    only_train = [c for c in train_set.classes if c not in val_set.classes]
    only_val = [c for c in val_set.classes if c not in train_set.classes]
    said = [
        f"{listed(only_train)} only in train/" if only_train else "",
        f"{listed(only_val)} only in val/" if only_val else "",
    ]
    return (
        f"train/ and val/ hold different class folders: {'; '.join(s for s in said if s)}. "
        "Give both the same class folders (the head's outputs follow their sorted names)"
    )


def split(targets: list[int], classes: list[str], fraction: float, seed: int):
    """A seeded random split of indices into (train, held out), ``fraction`` held out (at least
    one image when above 0); a class the draw left with no training image keeps one."""
    if fraction == 0:
        return list(range(len(targets))), []
    order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(fraction * len(order)))
    val, train = order[:n_val], order[n_val:]
    trained = {targets[i] for i in train}
    for c, name in enumerate(classes):
        if c in trained:
            continue
        held = [i for i in val if targets[i] == c]
        val.remove(held[0])
        train.append(held[0])
        print(
            f"note: class {name!r} has 1 image; it trains, none is held out"
            if len(held) == 1
            else f"note: --val-fraction {fraction} held out all {len(held)} images of class "
            f"{name!r}; one of them trains instead"
        )
    return train, val


def training_batches(dataset, args, generator: torch.Generator, **loader_args) -> DataLoader:
    """Shuffled training batches. A last batch of one image is dropped (a different one each
    epoch): BatchNorm layers in training cannot normalise a batch of one 1x1 feature map."""
    drop_last = len(dataset) % args.batch_size == 1 and len(dataset) > 1
    if drop_last:
        print(
            f"note: {len(dataset)} training images in batches of {args.batch_size} leave a last "
            "batch of 1, which BatchNorm cannot train on; it is dropped each epoch"
        )
    return DataLoader(
        dataset,
        args.batch_size,
        shuffle=True,
        generator=generator,
        drop_last=drop_last,
        **loader_args,
    )


def folder_data(args):
    tf = torchvision.transforms
    norm = tf.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    train_tf = tf.Compose(
        [tf.RandomResizedCrop(args.image_size), tf.RandomHorizontalFlip(), tf.ToTensor(), norm]
    )
    resize = round(args.image_size * 256 / 224)
    eval_tf = tf.Compose([tf.Resize(resize), tf.CenterCrop(args.image_size), tf.ToTensor(), norm])
    train_set, val_set, classes = image_folders(args, train_tf, eval_tf)
    if val_set is not None:
        print(f"data: {len(train_set)} train / {len(val_set)} val images, {len(classes)} classes")
    else:
        why = "--val-fraction 0" if args.val_fraction == 0 else "every image is needed to train"
        print(f"data: {len(train_set)} train images, no validation ({why}), {len(classes)} classes")
    loader_args = {"num_workers": args.workers, "pin_memory": args.device.startswith("cuda")}
    loader = training_batches(
        train_set, args, torch.Generator().manual_seed(args.seed), **loader_args
    )
    val_loader = None
    if val_set is not None:
        val_loader = DataLoader(val_set, max(64, args.batch_size), **loader_args)
    return loader, val_loader, classes


def run_folder(args) -> dict:
    train_loader, val_loader, classes = folder_data(args)
    weights = load_weights(args.weights, args)
    seed_everything(args.seed)
    model = torchvision.models.resnet18(num_classes=len(classes))  # the new head
    model.to(args.device)
    start = time.perf_counter()
    acc, loss = fine_tune(
        model,
        weights,
        train_loader,
        val_loader,
        args,
        freeze=args.freeze,
        desc="fine-tune",
        val_loader=val_loader,
    )
    seconds = time.perf_counter() - start
    save_weights(model, args.out, classes)
    metrics = {"val_acc": acc, "train_loss": loss}
    shown = " ".join(f"{k}={v:.3f}" for k, v in metrics.items() if v is not None)
    print(f"RESULT {shown} time={seconds:.0f}s")
    return {**metrics, "time": seconds, "out": args.out, "classes": classes}


# --------------------------------------------------------------------------- the demo

# Each 8x8 digit is upscaled to 20x20 px and placed on a black 32x32 image at a random spot.
# Why not just upscale to 32x32: sklearn's digits are centred and size-normalised, so with 10
# labels per class a linear classifier on raw pixels already gets ~94% on digits 5-9 and
# features learned on 0-4 add nothing. At random positions a model must also learn to ignore
# where the digit is: pretraining on ~700 images of 0-4 (at a new spot each epoch) teaches
# that, 50 labelled images of 5-9 do not. That is the situation transfer learning is for.
CANVAS, GLYPH = 32, 20


class PlacedDigits(Dataset):
    """Digits (upscaled to GLYPH px) on a black CANVAS px image, as 3-channel tensors.

    Each image sits at its own fixed, seeded position; with ``jitter=True`` at a new random
    position on every read instead (the augmentation used for pretraining).
    """

    def __init__(self, glyphs, labels, offsets, *, jitter=False):
        self.glyphs, self.labels, self.offsets, self.jitter = glyphs, labels, offsets, jitter

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.jitter:
            row, col = torch.randint(0, CANVAS - GLYPH + 1, (2,)).tolist()
        else:
            row, col = self.offsets[i].tolist()
        image = torch.zeros(1, CANVAS, CANVAS)
        image[:, row : row + GLYPH, col : col + GLYPH] = self.glyphs[i]
        return ((image - 0.12) / 0.25).expand(3, -1, -1), self.labels[i]


DEMO_VAL = 100  # images of digits 5-9 that show the per-epoch progress, apart from the test set


def digits_demo_data(seed: int, shots: int, limit: int | None = None):
    """The two tasks, split by ``seed``: digits 0-4 to pretrain on (a fifth held out), and
    digits 5-9 with ``shots`` labelled images per class, ``DEMO_VAL`` others to show progress
    per epoch, tested on all the rest (at most ``limit`` images to pretrain on and to test on,
    for a quick run)."""
    from sklearn.datasets import load_digits

    digits = load_digits()  # 1797 8x8 grey images, values 0..16
    glyphs = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16
    glyphs = F.interpolate(glyphs, size=GLYPH, mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randint(0, CANVAS - GLYPH + 1, (len(labels), 2), generator=gen)
    order = torch.randperm(len(labels), generator=gen)
    old = order[labels[order] < 5]
    new = order[labels[order] >= 5]
    most = min(labels[new].bincount()[5:].min().item(), (len(new) - DEMO_VAL - 1) // 5)
    if shots > most:  # the rest of digits 5-9 show progress and test
        raise RecipeError(
            f"--shots {shots}: must be at most {most} (digits 5-9 need the rest to show "
            "progress and to test on), e.g. --shots 10"
        )
    n_val = len(old) // 5
    few = torch.cat([new[labels[new] == c][:shots] for c in range(5, 10)])
    rest = new[~torch.isin(new, few)]

    def subset(idx, shift, jitter=False):
        return PlacedDigits(glyphs[idx], labels[idx] - shift, offsets[idx], jitter=jitter)

    return {
        "pretrain": subset(old[n_val:][:limit], 0, jitter=True),
        "pretrain_val": subset(old[:n_val], 0),
        "train": subset(few, 5),
        "val": subset(rest[:DEMO_VAL], 5),
        "test": subset(rest[DEMO_VAL:][:limit], 5),
    }


def pretrain(data, args, ckpt_path: Path) -> float:
    """Stand-in for someone else's multi-GPU training script: plain training on digits 0-4,
    saved the way DistributedDataParallel code saves (``module.`` keys, training state)."""
    seed_everything(args.seed)
    model = torchvision.models.resnet18(num_classes=5).to(args.device)
    loader = DataLoader(
        data["pretrain"],
        batch_size=64,
        shuffle=True,
        generator=torch.Generator().manual_seed(args.seed),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    val_loader = DataLoader(data["pretrain_val"], batch_size=256)
    train(
        model,
        loader,
        optimizer,
        epochs=args.pretrain_epochs,
        device=args.device,
        desc="pretrain",
        val_loader=val_loader,
    )
    acc = evaluate(model, val_loader, device=args.device)
    ckpt_path.parent.mkdir(parents=True, exist_ok=True)
    state_dict = {"module." + k: v for k, v in model.state_dict().items()}
    torch.save(
        {
            "epoch": args.pretrain_epochs,
            "state_dict": state_dict,
            "optimizer": optimizer.state_dict(),
        },
        ckpt_path,
    )
    return acc


def run_demo(args) -> dict:
    total_start = time.perf_counter()
    data = digits_demo_data(args.seed, args.shots, limit=256 if args.quick else None)
    print(
        f"demo data: pretrain on digits 0-4 ({len(data['pretrain'])} images, "
        f"{len(data['pretrain_val'])} held out); new task digits 5-9 with {len(data['train'])} "
        f"labelled images ({args.shots} per class), {len(data['val'])} to show progress, "
        f"tested on the other {len(data['test'])}"
    )

    ckpt_path = Path(args.workdir) / "resnet18_digits0-4.pth"
    start = time.perf_counter()
    pretrain_acc = pretrain(data, args, ckpt_path)
    pretrain_time = time.perf_counter() - start
    print(
        f"pretrained on digits 0-4: held-out accuracy {pretrain_acc:.3f} "
        f"({pretrain_time:.0f}s), saved {ckpt_path}"
    )
    weights = load_weights(str(ckpt_path), args)

    train_loader_gen = torch.Generator()
    train_loader = training_batches(data["train"], args, train_loader_gen)
    val_loader = DataLoader(data["val"], batch_size=256)
    test_loader = DataLoader(data["test"], batch_size=256)
    rows = {}
    runs = [
        ("scratch", "from scratch", None, "none"),
        ("head", "new head only", weights, "head-only"),
        ("finetune", "full fine-tune, param groups", weights, "none"),
    ]
    for key, title, row_weights, freeze in runs:
        print(f"\n== {title}")
        seed_everything(args.seed)  # the same new head and batch order for every row
        train_loader_gen.manual_seed(args.seed)
        model = torchvision.models.resnet18(num_classes=5).to(args.device)  # the new head
        start = time.perf_counter()
        acc, _ = fine_tune(
            model,
            row_weights,
            train_loader,
            test_loader,
            args,
            freeze=freeze,
            desc=key,
            val_loader=val_loader,
        )
        rows[key] = (title, acc, time.perf_counter() - start)
        print(f"{title}: test accuracy {acc:.3f}")
        if key == "finetune":
            save_weights(model, args.out, [str(c) for c in range(5, 10)])

    total = time.perf_counter() - total_start
    majority = data["test"].labels.bincount().max().item() / len(data["test"])
    accs = {k: v[1] for k, v in rows.items()}
    print(
        f"\nThe new task: digits 5-9 from {args.shots} labelled images per class, "
        f"{args.epochs} epochs; test accuracy on {len(data['test'])} other images"
    )
    print(f"{'method':<30}  {'test acc':>8}  {'time':>6}")
    print(f"{'-' * 30}  {'-' * 8}  {'-' * 6}")
    for title, acc, seconds in rows.values():
        print(f"{title:<30}  {acc:>8.3f}  {seconds:>5.1f}s")
    print(
        "  from scratch:   a randomly initialised resnet18, every layer trained on the "
        f"{len(data['train'])} images\n"
        "  new head only:  the digits 0-4 checkpoint, frozen; only a new 5-class fc trains\n"
        "  full fine-tune: the checkpoint with a new fc; every layer trains, earlier blocks "
        f"at smaller learning rates (layer decay {args.layer_decay})\n"
        f"  chance: 0.200 (5 classes; always answering the most common one scores "
        f"{majority:.3f})"
    )
    print(
        f"transfer gain over from scratch: {accs['head'] - accs['scratch']:+.3f} (new head "
        f"only), {accs['finetune'] - accs['scratch']:+.3f} (full fine-tune)"
    )
    print(
        f"(pretraining on digits 0-4: {pretrain_time:.1f}s, held-out accuracy "
        f"{pretrain_acc:.3f}; total {total:.0f}s on {torch.get_num_threads()} CPU "
        f"thread{'s' * (torch.get_num_threads() != 1)})"
    )
    print(
        f"RESULT scratch_acc={accs['scratch']:.3f} head_acc={accs['head']:.3f} "
        f"finetune_acc={accs['finetune']:.3f} total_time={total:.0f}s"
    )
    return {
        "pretrain_acc": pretrain_acc,
        **{f"{k}_acc": v for k, v in accs.items()},
        **{f"{k}_time": v[2] for k, v in rows.items()},
        "total_time": total,
        "checkpoint": str(ckpt_path),
        "out": args.out,
    }


# --------------------------------------------------------------------------- main


# What each numeric option accepts: (test, what it must be, an example).
LIMITS = {
    "epochs": (lambda v: v >= 1, "at least 1", "10"),
    "pretrain_epochs": (lambda v: v >= 1, "at least 1", "20"),
    "batch_size": (lambda v: v >= 1, "at least 1", "16"),
    "shots": (lambda v: v >= 1, "at least 1", "10"),
    "image_size": (lambda v: v >= 1, "at least 1 (pixels)", "224"),
    "workers": (lambda v: v >= 0, "0 (load in the main process) or more", "2"),
    "threads": (lambda v: v >= 1, "at least 1", "1"),
    "val_fraction": (
        lambda v: 0 <= v < 1,
        "in [0, 1): the share of DATA held out for validation (0: train on every image, "
        "without validation)",
        "0.2",
    ),
    "lr": (lambda v: math.isfinite(v) and v > 0, "a positive number", "1e-2"),
    "scratch_lr": (lambda v: math.isfinite(v) and v > 0, "a positive number", "1e-3"),
    "weight_decay": (lambda v: math.isfinite(v) and v >= 0, "0 or more", "0.05"),
    "layer_decay": (lambda v: 0 < v <= 1, "above 0 and at most 1 (1: no decay)", "0.3"),
}


def check_args(args) -> None:
    """Refuse out-of-range numbers and an unusable device before any work, one line each."""
    for name, (ok, what, example) in LIMITS.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            flag = "--" + name.replace("_", "-")
            raise RecipeError(f"{flag} {value}: must be {what}, e.g. {flag} {example}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise RecipeError(f"--device {args.device}: not a device; give cpu or cuda") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError(f"--device {args.device}: no CUDA device here; give --device cpu")


def as_flags(error: Exception) -> str:
    """The library's advice names Python arguments (each a ``surgery.Fix`` in the message);
    here they are worded as this script's options."""
    if not isinstance(error, surgery.SurgeryError):
        return str(error)
    names = getattr(error, "globals", None) or []

    def flag(fix) -> str:
        if fix.option == "trust_pickle":
            return "--trust-pickle"
        if fix.option == "allow_globals":
            given = fix.value if isinstance(fix.value, (list, tuple)) else names
            return " ".join(f"--allow-global {n}" for n in given) or "--allow-global MODULE.NAME"
        return str(fix)

    return error.render(flag)


def main(argv: list[str] | None = None) -> dict:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    demo = args.weights is None and args.data is None
    if (args.weights is None) != (args.data is None):
        parser.error("--weights and --data go together (neither: the demo)")
    try:
        check_args(args)
        configure(args, demo)
        print(
            "resnet18_head:",
            " ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()),
        )
        threads = torch.get_num_threads()
        print(
            f"mode: {'demo' if demo else 'your data'}, torch {torch.__version__}, "
            f"{threads} CPU thread{'s' * (threads != 1)}"
        )
        if isinstance(args.freeze, list):  # a typo fails now, not after a download
            with surgery.empty_init():
                probe = torchvision.models.resnet18()
            try:
                surgery.freeze(probe, *args.freeze)
            except surgery.SelectorError as e:
                raise RecipeError(f"--freeze {','.join(args.freeze)}: {e}") from None
        return run_demo(args) if demo else run_folder(args)
    except (RecipeError, surgery.SurgeryError) as e:
        print(f"resnet18_head: error: {as_flags(e)}", file=sys.stderr)
        raise SystemExit(2) from None


def configure(args, demo: bool) -> None:
    """Fill in the defaults that depend on the mode; set threads and determinism."""
    if args.epochs is None:
        args.epochs = (2 if args.quick else 30) if demo else 10
    if demo and args.quick:
        args.pretrain_epochs = 1
    if args.workdir is None:
        args.workdir = "runs/quick" if demo and args.quick else "runs/resnet18_head"
    if args.out is None:
        folder = args.workdir if demo else "runs/finetune"
        args.out = str(Path(folder) / "finetuned.safetensors")
    if args.device is None:
        args.device = "cpu" if demo or not torch.cuda.is_available() else "cuda"
    if args.freeze not in ("head-only", "none"):
        args.freeze = [s for s in re.split(r"[,\s]+", args.freeze) if s]
    if args.threads is None and demo:
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    # Deterministic under --seed: seeded generators everywhere, deterministic kernels.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True, warn_only=True)


if __name__ == "__main__":
    main()
