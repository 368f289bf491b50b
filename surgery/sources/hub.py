"""Hub names for checkpoints: ``hf-hub:org/name``, ``timm:NAME``, ``torchvision:WEIGHTS``.

Each name resolves to a local file through the owning library's own download and cache code
(``huggingface_hub``, timm's pretrained configs, torchvision's weight enums with torch.hub's
cache); surgery downloads nothing itself. ``HF_HUB_OFFLINE=1`` keeps all three offline: a
cached file is used, anything else is a :class:`CheckpointError` naming the cache path.
"""

from __future__ import annotations

import difflib
import os
import posixpath
from pathlib import Path
from urllib.parse import urlparse

from .. import _json
from ..errors import CheckpointError

__all__ = ["hub_file", "is_hub_name"]

_PREFIXES = ("hf-hub:", "hf_hub:", "timm:", "torchvision:")

# What a Hugging Face model repo holds its weights in, the way timm and transformers look.
_HF_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.bin",
)


def is_hub_name(spec: object) -> bool:
    """True for a string starting with ``hf-hub:``, ``timm:`` or ``torchvision:``."""
    return isinstance(spec, str) and spec.startswith(_PREFIXES)


def hub_file(spec: str) -> Path:
    """The local checkpoint file of a hub name, downloaded (once) by the library that owns it.

    - ``hf-hub:org/name`` (optionally ``@revision``, and ``/path/in/repo`` for a given file):
      ``huggingface_hub.hf_hub_download`` into its cache (``HF_HUB_CACHE``); without a file,
      the first of ``model.safetensors``, ``pytorch_model.bin`` (or their sharded indexes) the
      repo has. A sharded index comes with its shards beside it.
    - ``timm:NAME`` (``resnet18.a1_in1k``; a bare architecture means its default tag): the
      hub repo and file timm's pretrained config names, fetched as above; configs with only a
      URL use torch.hub's cache like torchvision.
    - ``torchvision:ResNet18_Weights.IMAGENET1K_V1`` (or ``torchvision:resnet18`` for the
      default weights): the enum's URL, cached at ``torch.hub.get_dir()/checkpoints/<file>``.

    With ``HF_HUB_OFFLINE=1`` nothing is downloaded: a file not in the cache raises
    :class:`CheckpointError` naming the cache path and how to pass a local file instead.
    ``load_partial`` and ``read_checkpoint`` accept these names directly.

    Example:
        >>> surgery.hub_file("timm:resnet18.a1_in1k")  # doctest: +SKIP
        PosixPath('.../models--timm--resnet18.a1_in1k/snapshots/.../model.safetensors')
    """
    if not is_hub_name(spec):
        raise CheckpointError(
            f"{spec!r} is not a hub name; hub names start with 'hf-hub:', 'timm:' or "
            "'torchvision:' (e.g. 'timm:resnet18.a1_in1k')"
        )
    scheme, _, name = spec.partition(":")
    if not name:
        raise CheckpointError(f"{spec!r} names nothing after '{scheme}:'")
    if scheme in ("hf-hub", "hf_hub"):
        return _hf_file(name, spec)
    if scheme == "timm":
        return _timm_file(name, spec)
    return _torchvision_file(name, spec)


def _offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub read it at import, or as set since."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.is_offline_mode())


def _local_hint(spec: str) -> str:
    return (
        f"or pass the path of a local copy instead of {spec!r}, e.g. "
        "load_partial(model, 'path/to/model.safetensors')"
    )


# --------------------------------------------------------------------------- Hugging Face


def _hf_file(name: str, spec: str) -> Path:
    """``org/name[@rev][/file]`` -> a file in the huggingface_hub cache."""
    parts = name.split("/")
    n_repo = 2 if len(parts) >= 2 else 1
    repo_id, filename = "/".join(parts[:n_repo]), "/".join(parts[n_repo:]) or None
    repo_id, _, revision = repo_id.partition("@")
    return _hf_download(repo_id, filename, revision or None, spec)


def _hf_download(repo_id: str, filename: str | None, revision: str | None, spec: str) -> Path:
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise CheckpointError(
            f"{spec!r} needs huggingface_hub (pip install huggingface_hub), " + _local_hint(spec)
        ) from None
    offline = _offline()
    candidates = [filename] if filename else list(_HF_FILES)
    not_cached: list[str] = []
    for candidate in candidates:
        try:
            path = Path(
                hf_hub_download(
                    repo_id,
                    candidate,
                    revision=revision,
                    local_files_only=offline,
                    library_name="surgery",
                )
            )
        except LocalEntryNotFoundError:  # offline (or no network) and not cached
            not_cached.append(candidate)
            continue
        except EntryNotFoundError:  # online: the repo has no such file
            continue
        except Exception as e:  # repo or revision not found, gated, HTTP and network errors
            raise CheckpointError(
                f"cannot get {spec!r} from the Hugging Face Hub: {type(e).__name__}: "
                f"{_first_line(str(e))}. Check the repo name and your access, " + _local_hint(spec)
            ) from None
        if path.name.endswith(".index.json"):
            _hf_shards(repo_id, path, candidate, revision, offline, spec)
        return path
    cache = Path(constants.HF_HUB_CACHE) / ("models--" + repo_id.replace("/", "--"))
    looked = ", ".join(candidates)
    if not_cached:
        why = (
            "HF_HUB_OFFLINE=1 forbids downloading it" if offline else "the Hub could not be reached"
        )
        raise CheckpointError(
            f"{spec!r} is not in the Hugging Face cache ({cache}; looked for {looked}) and "
            f"{why}. Download it once with network access (`hf download {repo_id}"
            f"{' ' + candidates[0] if filename else ''}`, or unset HF_HUB_OFFLINE), "
            + _local_hint(spec)
        )
    raise CheckpointError(
        f"the Hugging Face repo '{repo_id}' has none of {looked}; name the file, e.g. "
        f"'hf-hub:{repo_id}/weights.safetensors', " + _local_hint(spec)
    )


def _hf_shards(
    repo_id: str, index: Path, in_repo: str, revision: str | None, offline: bool, spec: str
) -> None:
    """Fetch every shard a sharded index lists, from the same commit, beside the index."""
    from huggingface_hub import hf_hub_download

    snapshot = index.parents[in_repo.count("/")]
    if snapshot.parent.name == "snapshots":
        revision = snapshot.name  # the commit the index came from
    try:
        weight_map = _json.read_file(index, limit=_json.MAX_INDEX)["weight_map"]
        shards = sorted({str(v) for v in weight_map.values()})
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return  # open_source reports a malformed index with its own message
    folder = posixpath.dirname(in_repo)
    for shard in shards:
        try:
            hf_hub_download(
                repo_id,
                posixpath.join(folder, shard),
                revision=revision,
                local_files_only=offline,
                library_name="surgery",
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot get shard '{shard}' of {spec!r} (listed in {index}): "
                f"{type(e).__name__}: {_first_line(str(e))}. "
                + ("HF_HUB_OFFLINE=1 forbids downloading it; " if offline else "")
                + _local_hint(spec)
            ) from None


# --------------------------------------------------------------------------- timm


def _timm_file(name: str, spec: str) -> Path:
    import timm
    from timm.models import get_pretrained_cfg

    try:
        cfg = get_pretrained_cfg(name)
    except RuntimeError as e:  # a known architecture with an unknown tag
        cfg, detail = None, str(e)
    else:
        detail = ""
    if cfg is None:
        arch = name.partition(".")[0]
        close = timm.list_pretrained(f"{arch}.*")[:8]  # the tags of a known architecture
        if not close:
            archs = sorted({n.partition(".")[0] for n in timm.list_pretrained()})
            close = difflib.get_close_matches(arch, archs, n=5)
        raise CheckpointError(
            f"timm has no pretrained weights named {name!r}"
            + (f" ({detail})" if detail else "")
            + (f"; close names: {', '.join(close)}" if close else "")
            + f". timm.list_pretrained('{arch[:4]}*') lists them."
        )
    if cfg.hf_hub_id:
        return _hf_download_spec(cfg.hf_hub_id, cfg.hf_hub_filename, spec)
    if cfg.file:
        return Path(cfg.file)
    if cfg.url:
        return _url_file(cfg.url, spec)
    raise CheckpointError(
        f"timm's pretrained config for {name!r} names no hub repo, file or URL; "
        + _local_hint(spec)
    )


def _hf_download_spec(hf_hub_id: str, filename: str | None, spec: str) -> Path:
    repo_id, _, revision = hf_hub_id.partition("@")
    return _hf_download(repo_id, filename, revision or None, spec)


# --------------------------------------------------------------------------- torchvision


def _torchvision_file(name: str, spec: str) -> Path:
    from torchvision.models import get_model_weights, get_weight

    try:
        weights = get_weight(name) if "." in name else get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError, TypeError) as e:  # TypeError: not an enum
        raise CheckpointError(
            f"torchvision has no weights {name!r} ({_first_line(str(e))}); name an enum value "
            "like 'torchvision:ResNet18_Weights.IMAGENET1K_V1', or a model like "
            "'torchvision:resnet18' for its default weights"
        ) from None
    return _url_file(weights.url, spec)


def _url_file(url: str, spec: str) -> Path:
    """torch.hub's cache path for ``url``, downloaded there by torch.hub when missing."""
    import torch.hub

    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if path.is_file():
        return path
    if _offline():
        raise CheckpointError(
            f"{spec!r} is not in torch.hub's cache ({path}) and HF_HUB_OFFLINE=1 forbids "
            f"downloading it from {url}. Download it once with network access (or put the "
            "file at that path), " + _local_hint(spec)
        )
    hashed = torch.hub.HASH_REGEX.search(path.name)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # torch.hub's own download (what load_state_dict_from_url uses), without unpickling.
        torch.hub.download_url_to_file(
            url, str(path), hash_prefix=hashed.group(1) if hashed else None
        )
    except Exception as e:
        raise CheckpointError(
            f"cannot download {spec!r} from {url} to {path}: {type(e).__name__}: "
            f"{_first_line(str(e))}. " + _local_hint(spec)
        ) from None
    return path


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else ""
