"""Tensors in this process's memory: CPU, a GPU, or ``meta`` materialised while loading.

:class:`LocalWriter` is the one writer of a local load. It reads each checkpoint tensor
straight from the file into the model's memory (peak near one copy; skipped tensors are never
read), file by file so a sharded checkpoint is read shard by shard: the tensors of a file that
land in CPU memory through one :meth:`~surgery.sources.CheckpointSource.read_many_into` (a few
threads at once; a DCP folder reads them in one pass), then the rest one at a time (prepared
values, GPU targets through pinned staging buffers). A meta model is materialised on the way:
its tensors are read into new memory, and only once every read succeeded are modules with
tensors the checkpoint lacks given memory and reset, and the new memory put in place of the
meta tensor in every module holding it. With ``assign=True`` (:mod:`.assign`) every tensor
was made at prepare and the writer only puts them in place.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ... import _progress
from ..._sysmem import available_memory, format_bytes
from ..._tensors import Holders, holders, replace
from ...errors import LoadError, SurgeryError, UsageError
from ...sources import CheckpointSource
from ..check import CheckedPlan
from ..coordinators import LocalCoordinator
from ..handlers import Commit, Write
from ..plan import Adapter
from ..units import materialise
from .assign import assigned, check_assign, taken_as_is

__all__ = ["LocalPlacement", "LocalWriter", "Staging", "check_device"]


class LocalPlacement:
    """A model whose tensors are in this process: the coordinator agrees with itself."""

    sharded = False

    def __init__(
        self, model: nn.Module, state: Mapping[str, Any], device: Any, assign: bool = False
    ) -> None:
        self.model = model
        if assign:
            check_assign(model, state, device)
        self.device = check_device(state, device)
        self.assign = assign
        self.coordinator = LocalCoordinator()

    def adapter(self, adapter: Adapter | None) -> Adapter | None:
        return adapter

    def check(self, state: Mapping[str, Any]) -> None:
        """Nothing to check before planning: the device was checked when placed."""

    def prepare(
        self, checked: CheckedPlan, writes: list[Write], source: CheckpointSource
    ) -> list[Write]:
        """Refuse, before the first write, to materialise meta tensors that do not fit; with
        ``assign=True``, give every write the tensor it puts into the model (see
        :mod:`.assign`): the source's own where it needs no copy, else read now."""
        if not self.assign:
            if checked.initialise is not None:
                check_memory(self.model, checked.state)
            return writes
        taken = taken_as_is(writes, source)
        if checked.initialise is not None:
            check_memory(self.model, checked.state, {id(writes[i].target) for i in taken})
        return assigned(writes, source, taken)

    def writer(self, commit: Commit) -> LocalWriter:
        return LocalWriter(self.model, commit, self.device)


class LocalWriter:
    """Writes a prepared load into a local model; see the module docstring."""

    def __init__(self, model: nn.Module, commit: Commit, device: torch.device | None) -> None:
        self.model, self.state, self.source = model, commit.state, commit.source
        self.device = device
        self.dev = device or torch.device("cpu")
        self.progress = commit.progress
        self.assign = commit.assign
        initialise = commit.initialise
        self.init_modules = initialise[0] if initialise is not None else []
        # A load that materialises (some tensor is on meta) reads into new memory and puts
        # it in place only after every read succeeded; so does assign=True.
        self.fresh_memory = initialise is not None
        self.owners: Holders = holders(model) if self.fresh_memory or self.assign else {}
        self.replaced: dict[int, Tensor] = {}
        self._unit_owners: Holders | None = None
        self._installed = False
        self.read_done = 0  # tensors read so far

    def current(self, t: Tensor) -> Tensor:
        return self.replaced.get(id(t), t)

    def begin(self) -> None:
        """Nothing before the reads: :meth:`write` materialises once they all succeeded."""

    @torch.no_grad()
    def write(self, writes: Sequence[Write]) -> None:
        """Carry out ``writes``: with ``assign=True`` put each prepared tensor in place; else
        read the CPU targets of each file at once (new memory for a load that materialises,
        the model's own otherwise), materialise, then the rest one at a time (prepared
        values, GPU targets through pinned staging buffers)."""
        if self.assign:
            self._install([(w.target, w.value) for w in writes])  # type: ignore[misc]
            return
        source = self.source
        files = {w.ckpt_key: source.files.get(w.ckpt_key, source.description) for w in writes}
        sizes: dict[str, int] = {}  # file -> bytes read from it, in reading order
        for w in writes:
            shape, dtype = source.specs[w.ckpt_key]
            file = files[w.ckpt_key]
            sizes[file] = sizes.get(file, 0) + shape.numel() * dtype.itemsize
        batch, fresh, rest = self._split(writes)
        staging = Staging()
        with _progress.Bars(sizes, self.progress) as bars:

            def count(key: str) -> None:
                shape, dtype = source.specs[key]
                bars.update(files[key], shape.numel() * dtype.itemsize)

            try:
                by_file: dict[str, dict[str, Tensor]] = {}
                for key, out in batch.items():  # file by file: one progress bar at a time
                    by_file.setdefault(files[key], {})[key] = out
                for todo in by_file.values():
                    self._read_batch(todo, count)
                self._install(fresh)
                for w in rest:
                    self._write_one(w, staging)
                    count(w.ckpt_key)
            finally:
                staging.finish()

    def _split(
        self, writes: Sequence[Write]
    ) -> tuple[dict[str, Tensor], list[tuple[Tensor, Tensor]], list[Write]]:
        """(checkpoint key -> CPU tensor to read it into, (model tensor, its new memory), the
        writes done one at a time). A write into a region reads into that part of the target
        (one new tensor for all the regions of a target that materialises)."""
        batch: dict[str, Tensor] = {}
        fresh: dict[int, tuple[Tensor, Tensor]] = {}
        rest: list[Write] = []
        for w in writes:
            target = w.target
            if w.value is not None or w.ckpt_key in batch:
                rest.append(w)
            elif self.fresh_memory and self.dev.type == "cpu" and not target.is_cuda:
                if id(target) not in fresh:
                    new = torch.empty(target.shape, dtype=target.dtype, device=self.dev)
                    fresh[id(target)] = (target, new)
                new = fresh[id(target)][1]
                batch[w.ckpt_key] = new if w.region is None else w.region.of(new)
            elif not self.fresh_memory and not target.is_meta and not target.is_cuda:
                batch[w.ckpt_key] = target if w.region is None else w.region.of(target)
            else:
                rest.append(w)
        return batch, list(fresh.values()), rest

    def _read_batch(self, batch: dict[str, Tensor], count: Callable[[str], None]) -> None:
        """The batched reads of one file. Into the model's own tensors, a failure after some
        reads finished says the model is partly loaded; into new memory (a model that
        materialises) it leaves the model untouched."""

        def counted(key: str) -> None:
            self.read_done += 1
            count(key)

        try:
            self.source.read_many_into(batch, on_read=counted)
        except SurgeryError as e:
            if self.fresh_memory or not self.read_done:
                raise
            raise LoadError(
                f"{e} {type(self.model).__name__}'s tensors are read into in place, and "
                f"{self.read_done} were read before this failure: the model is partly loaded. "
                "Load it again once the checkpoint is intact (a model built under "
                "surgery.empty_init() is left untouched by a failed load)."
            ) from e

    def _install(self, fresh: Sequence[tuple[Tensor, Tensor]]) -> None:
        """Materialise, then put new tensors in place: a meta model placed on a device gets
        its real tensors (buffers computed in ``__init__``) moved there; modules with tensors
        the checkpoint lacks get memory (zeros) and are reset; then each (model tensor, new
        tensor) of ``fresh`` takes its place in every module holding it."""
        if not self._installed:
            self._installed = True
            self._materialise()
        for orig, new in fresh:
            self.replaced[id(orig)] = replace(self.current(orig), new, self.owners[id(orig)])

    def _materialise(self) -> None:
        if self.owners and self.device is not None:
            for where in self.owners.values():
                mod, name, is_param = where[0]
                t = (mod._parameters if is_param else mod._buffers)[name]
                if not t.is_meta and t.device != self.dev:
                    self.replaced[id(t)] = replace(t, t.to(self.dev), where)
        for mod in self.init_modules:
            for t in [*mod._parameters.values(), *mod._buffers.values()]:
                if t is not None and t.is_meta and id(t) not in self.replaced:
                    new = torch.zeros(t.shape, dtype=t.dtype, device=self.dev)
                    self.replaced[id(t)] = replace(t, new, self.owners[id(t)])
            mod.reset_parameters()

    def _write_one(self, w: Write, staging: Staging) -> None:
        target = self.current(w.target)
        if w.region is not None:  # a part of the target: materialise it once, fill the part
            if target.is_meta:
                new = torch.empty(target.shape, dtype=target.dtype, device=self.dev)
                target = replace(target, new, self.owners[id(w.target)])
                self.replaced[id(w.target)] = target
            self._read(w.ckpt_key, w.region.of(target), staging)
            return
        is_fresh = target.is_meta
        if is_fresh:
            target = torch.empty(target.shape, dtype=target.dtype, device=self.dev)
        if w.value is not None:
            target.copy_(w.value)
        else:
            self._read(w.ckpt_key, target, staging)
        if is_fresh:
            self.replaced[id(w.target)] = replace(
                self.current(w.target), target, self.owners[id(w.target)]
            )

    def _read(self, key: str, out: Tensor, staging: Staging) -> None:
        if out.is_cuda and _on_host(self.source.resident(key)):
            staging.read_into(self.source, key, out)
        else:
            self.source.read_into(key, out)

    def materialise(self, module: nn.Module) -> None:
        """Real (empty) memory for a module's own loading to copy into."""

        def owners() -> Holders:
            if self._unit_owners is None:
                self._unit_owners = holders(self.model)
            return self._unit_owners

        materialise(module, owners)


def _on_host(device: torch.device | None) -> bool:
    """A tensor read from a file, or resident in CPU memory: staged on its way to a GPU (one
    already in device memory is copied device to device)."""
    return device is None or device.type == "cpu"


def check_device(
    state: Mapping[str, Any], device: str | torch.device | None
) -> torch.device | None:
    """The device a meta model is materialised on, checked before anything is written.

    ``None`` keeps today's rule: tensors load onto the device the model's tensors are on
    (a meta model's on CPU). A device places a meta model's tensors there; a model that is not
    on ``meta`` and has tensors on another device is refused rather than moved.
    """
    if device is None:
        return None
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as ex:
        raise UsageError(
            f"device={device!r} is not a torch device; pass 'cpu', 'cuda', 'cuda:1', ..."
        ) from ex
    if dev.type == "meta":
        raise UsageError(
            "device='meta' would load nothing; build the model under surgery.empty_init() and "
            "pass the device to put it on (device='cpu' or 'cuda')"
        )
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"device={device!r}, but torch.cuda.is_available() is False here; pass "
                "device='cpu' or leave it out"
            )
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    tensors = [t for t in state.values() if isinstance(t, Tensor)]
    if not any(t.is_meta for t in tensors):
        elsewhere = sorted({str(t.device) for t in tensors if t.device != dev})
        if elsewhere:
            raise UsageError(
                f"the model already lives on {', '.join(elsewhere)}; device= only places a meta "
                f"model's tensors (built under surgery.empty_init()). Leave device= out to "
                f"load onto the model's device, or move it first with model.to('{dev}')."
            )
    return dev


def check_memory(model: nn.Module, state: Mapping[str, Any], shared: Collection[int] = ()) -> None:
    """Refuse, before the first write, to materialise meta tensors that do not fit in memory
    (those in ``shared``, ids taken as they lie in the file's mapping, need none)."""
    sizes: dict[int, int] = {}
    for t in state.values():
        if t.is_meta and id(t) not in shared:
            sizes[id(t)] = t.numel() * t.element_size()
    need = sum(sizes.values())
    free = available_memory()
    if free is not None and need > free:
        raise LoadError(
            f"materialising {type(model).__name__} from the meta device needs "
            f"{format_bytes(need)} of memory, only {format_bytes(free)} is available. Nothing "
            "was loaded. Load a part of it (skip=...), a smaller dtype (model.to(torch.float16) "
            "before loading), or on a machine with more memory."
        )


class Staging:
    """Reads into CUDA memory through page-locked (pinned) CPU buffers.

    The file is read into a pinned buffer, then copied with ``non_blocking=True``, so reading
    the next tensor overlaps copying this one. Two buffers alternate; each is reused only
    after the copy out of it has finished (a CUDA event). ``pin=False`` (tests without a GPU)
    uses ordinary memory and the same bookkeeping.
    """

    def __init__(self, pin: bool = True) -> None:
        self._pin = pin
        self._buffers: list[Tensor | None] = [None, None]
        self._events: list[object | None] = [None, None]
        self._turn = 0

    def read_into(self, source: CheckpointSource, key: str, out: Tensor) -> None:
        i, self._turn = self._turn, self._turn ^ 1
        self._wait(i)
        nbytes = out.numel() * out.element_size()
        buf = self._buffers[i]
        if buf is None or buf.numel() < nbytes:
            self._buffers[i] = None  # free the smaller buffer before taking a larger one
            buf = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self._pin)
            self._buffers[i] = buf
        staged = buf[:nbytes].view(out.dtype).view(out.shape)
        source.read_into(key, staged)
        out.copy_(staged, non_blocking=self._pin)
        if out.is_cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(out.device))
            self._events[i] = event

    def _wait(self, i: int) -> None:
        event = self._events[i]
        if event is not None:
            event.synchronize()  # type: ignore[attr-defined]
            self._events[i] = None

    def finish(self) -> None:
        """Wait for every copy still in flight, so the model's tensors are ready."""
        for i in range(len(self._events)):
            self._wait(i)
