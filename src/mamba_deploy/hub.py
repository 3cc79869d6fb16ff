"""Locating a model: a local file or folder, or a hub id ('org/name[@REVISION]') fetched through
huggingface_hub with one complete set of its weights. Reading what was found is checkpoint.py's."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import MambaDeployError, ModelNotFoundError
from .extras import install_hint

# one complete set of weights, in the order they are looked for: safetensors before .bin, the single
# file before its shard index, as transformers' from_pretrained picks them, so a folder holding both
# loads the same weights (transformers' save_pretrained leaves a stale index beside a single-file re-save,
# and a stale single file beside a sharded one)
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "consolidated.safetensors",
                "pytorch_model.bin", "pytorch_model.bin.index.json")

def resolve(path_or_id: str | os.PathLike, weights: bool = True) -> Path:
    """Local file/folder, or a hub id ('org/name', or 'org/name@REVISION' for a branch, tag or
    commit) resolved through huggingface_hub. weights=False: a hub repo's small files only
    (configs, tokenizers), for a tokenizer taken from another model (EleutherAI/gpt-neox-20b's
    weights are 41 GB)."""
    p = local_path(path_or_id)
    return p if p is not None else _download(str(path_or_id), weights)


def split_revision(s: str) -> tuple[str, str | None]:
    """'org/name@rev' -> ('org/name', 'rev'); a revision may hold '/' ('org/name@refs/pr/1')."""
    repo, at, rev = s.partition("@")
    return (repo, rev) if at and rev and repo.count("/") == 1 else (s, None)


def _in_hub_cache(repo: str, rev: str | None) -> bool:
    """Whether huggingface_hub's cache holds the repo at `rev` (no network)."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(repo, revision=rev, local_files_only=True)
    except Exception:  # noqa: BLE001  (not installed, not cached, not a valid id)
        return False
    return True


def local_path(path_or_id: str | os.PathLike) -> Path | None:
    """The existing local file/folder, or None for what can only be a hub id; ModelNotFoundError
    for a local path that does not exist (nothing is downloaded)."""
    if not isinstance(path_or_id, (str, os.PathLike)):
        raise ModelNotFoundError(f"a model path or hub id must be a str or Path, got {type(path_or_id).__name__} "
                                 f"{path_or_id!r:.60}")
    if not str(path_or_id).strip():  # Path("") is ".", the working folder: not what was meant
        raise ModelNotFoundError(f"the model path is empty ({str(path_or_id)!r}); pass a checkpoint folder, a .gguf "
                                 "file or a hub id like 'state-spaces/mamba-130m-hf'")
    s = str(path_or_id)
    try:
        p = Path(path_or_id).expanduser()
        exists = p.exists()
    except (RuntimeError, OSError) as e:  # ~user that does not exist; a name too long for the filesystem
        raise ModelNotFoundError(f"cannot use the model path {s!r:.120} ({e}); pass a checkpoint folder, a .gguf "
                                 "file or a hub id like 'state-spaces/mamba-130m-hf'") from e
    if exists:
        return p
    repo, rev = split_revision(s)
    looks_like_hub = (repo.count("/") == 1 and not s.startswith((".", "/", "~"))
                      and not repo.lower().endswith((".gguf", ".json")))
    if not looks_like_hub:
        raise ModelNotFoundError(f"no such file or folder: {s!r}; pass a checkpoint folder, a .gguf file or a hub id like 'state-spaces/mamba-130m-hf'")
    org, name = repo.split("/")
    # "models/typo" is a local typo, not an org, unless the hub cache holds it (a folder named
    # after the org is what `hf download ORG/NAME --local-dir ORG/NAME` leaves): no network here
    if Path(org).is_dir() and not _in_hub_cache(repo, rev):
        raise ModelNotFoundError(
            f"no such file or folder: {s!r} (the folder {org!r} has no {name!r}); pass a checkpoint folder or a .gguf "
            f"file; for the hub id {repo!r}, which the hub cache does not hold, download it first (`hf download "
            f"{repo}`) or run from a folder without {org!r}")
    return None


# small files every download takes: configs, shard indexes, tokenizers (tokenizer.model.v3: Mistral's),
# the chat template (transformers >= 4.49 saves it as chat_template.jinja, not in tokenizer_config.json)
HUB_SMALL_FILES = ["*.json", "*.txt", "*.model", "tokenizer.model*", "chat_template.jinja"]


def hub_patterns(names) -> list[str]:
    """allow_patterns fetching one complete set of weights from a hub repo whose files are `names`:
    a repo can hold the same weights twice (Mamba-Codestral: consolidated.safetensors beside HF
    shards; older repos: pytorch_model.bin beside model.safetensors), in the order weight_files
    reads them. Shards follow transformers' naming, model-00001-of-00002.safetensors."""
    names = {n for n in names if "/" not in n}  # sub-folders (onnx/, original/) are other artifacts
    for name in WEIGHT_FILES:
        if name in names and name in WEIGHT_INDEXES:
            stem, ext = name.removesuffix(".index.json").rsplit(".", 1)
            return HUB_SMALL_FILES + [f"{stem}-*.{ext}"]
        if name in names:
            return HUB_SMALL_FILES + [name]
    return HUB_SMALL_FILES + ["*.safetensors" if any(n.endswith(".safetensors") for n in names) else "*.bin"]


def _download(repo_id: str, weights: bool = True) -> Path:
    try:
        from huggingface_hub import HfApi, snapshot_download
    except ImportError as e:
        raise ModelNotFoundError(f"{repo_id!r} is not a local path and huggingface_hub is not installed; "
                                 f"{install_hint('huggingface_hub')}") from e
    repo, rev = split_revision(repo_id)
    if not _hub_resolves():  # offline: huggingface_hub would retry for ~25 s before failing
        try:  # an earlier download still serves
            return Path(snapshot_download(repo, revision=rev, local_files_only=True))
        except Exception as e:  # noqa: BLE001  (not in the cache)
            raise ModelNotFoundError(
                f"{repo_id!r} is not a local path, the hub ({_endpoint()}) cannot be reached (its host does not resolve, or "
                "does not answer: offline?) and the model is "
                "not in the local hub cache; download it elsewhere and pass the local folder") from e
    try:
        tries = [hub_patterns(HfApi().list_repo_files(repo, revision=rev)) if weights else HUB_SMALL_FILES]
    except Exception as e:  # noqa: BLE001  (offline / rate-limited: snapshot_download says which, or reads the cache)
        _refuse_repo_error(repo, rev, e)
        tries = [HUB_SMALL_FILES + ["*.safetensors"], HUB_SMALL_FILES + ["*.bin"]] if weights else [HUB_SMALL_FILES]
    first = None
    for patterns in tries:
        try:
            path = Path(snapshot_download(repo, revision=rev, allow_patterns=patterns))
        except Exception as e:  # noqa: BLE001  (hub raises many types: offline, 404, auth)
            _refuse_repo_error(repo, rev, e)
            first = first or e
            continue
        if not weights or path.is_file() or _has_weights(path):  # a pattern matching no weights: the next
            return path
    if first is None:  # every download worked and none brought weights
        return path  # load_model names the folder without weights
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    fix = ("HF_HUB_OFFLINE is set (offline) and the hub cache does not hold it: download it on a machine with network "
           "(or unset HF_HUB_OFFLINE) and pass the local folder" if offline else
           "If you are offline, download it elsewhere and pass the local folder, or use the cache "
           "with HF_HUB_OFFLINE=1; otherwise check the id and your network/token")
    raise ModelNotFoundError(
        f"{repo_id!r} is not a local path, and fetching it from the hub failed "
        f"({type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}). {fix}."
    ) from first


def _has_weights(folder: Path) -> bool:
    from .checkpoint import _weight_sources  # reading a folder is checkpoint.py's; it imports this module

    try:
        return bool(_weight_sources(folder))
    except MambaDeployError:
        return False


def _refuse_repo_error(repo: str, rev: str | None, e: Exception) -> None:
    """ModelNotFoundError with the fix for a hub answer no retry changes: a gated, missing or
    private repo, or a revision it does not have (with the server's own message)."""
    try:
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    except ImportError:  # huggingface_hub < 0.23
        from huggingface_hub.utils import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    said = " ".join(str(e).split())[:300]
    if isinstance(e, GatedRepoError):
        fix = (f"it is a gated repo: accept its terms at https://huggingface.co/{repo}, then log in "
               "(`hf auth login`, or set HF_TOKEN)")
    elif isinstance(e, RepositoryNotFoundError):
        fix = "no such model on the hub, or a private one: check the id, or log in (`hf auth login`, or set HF_TOKEN)"
    elif isinstance(e, RevisionNotFoundError):
        fix = f"the repo has no revision {rev!r}: check the branch, tag or commit after '@'"
    else:
        return
    raise ModelNotFoundError(f"{repo!r}{'@' + rev if rev else ''}: {fix} (hub: {said})") from e


REACH_TIMEOUT_S = 5.0  # one TCP connect to the hub; huggingface_hub's own calls retry a failure for ~25 s


def _hub_resolves() -> bool:
    """Whether the hub's host name resolves and its port takes a connection (instant when
    offline, seconds at most behind a firewall or with a dead HF_ENDPOINT; huggingface_hub's own
    calls retry each failure five times)."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:  # huggingface_hub reads its cache without trying the network
        return True
    url = urlparse(constants.ENDPOINT)
    if _proxied(url.hostname):  # behind a proxy only the proxy resolves outside names; huggingface_hub goes through it
        return True
    try:
        port = url.port or (80 if url.scheme == "http" else 443)
        with socket.create_connection((url.hostname, port), timeout=REACH_TIMEOUT_S):
            return True
    except (OSError, ValueError):  # no such name, refused, unreachable, timed out; a bad port in the URL
        return False


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _proxied(host: str | None) -> bool:
    """Whether requests to `host` go through a proxy (HTTPS_PROXY / ALL_PROXY and NO_PROXY, as
    huggingface_hub's HTTP client reads them)."""
    import urllib.request

    proxies = urllib.request.getproxies()
    return bool(host) and bool(proxies.get("https") or proxies.get("all")) and not urllib.request.proxy_bypass(host)
