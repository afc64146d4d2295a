"""Find the files of a checkpoint: a local directory or a Hugging Face hub repo, same file names either way.

`resolve_checkpoint` turns a `--checkpoint` argument (or `--demo`, one more source) into a `CheckpointFiles`
of local paths, downloading from the hub when needed (files already in the local HF cache resolve offline).
The checkpoint's voices (`voices.tgz` / `voices/`) are found with `voices.py`, which owns everything about
voices; the names re-exported below keep older imports working.

Every failure is a `CheckpointError` with a one-line message that says what to do. Nothing here runs at
import time.
"""

from __future__ import annotations

import inspect
import logging
import os
import re
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from personaplex.errors import CheckpointError, first_line
from personaplex.voices import (VOICE_AUDIO_SUFFIXES, VOICE_SUFFIXES, VOICES_ARCHIVE, VOICES_DIR,  # noqa: F401
                                extract_voices, find_voice, is_valid_voice_name, list_voices, voices_for)

logger = logging.getLogger(__name__)

# -- released file names ---------------------------------------------------------------------------------------
DEFAULT_REPO = "nvidia/personaplex-7b-v1"
MOSHIKO_REPO = "kyutai/moshiko-pytorch-bf16"  # Moshi-family repos use the same names but carry no voices

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
CONFIG_FILE = "config.json"  # optional: a Moshi-style flat LM config

# What `need` may name, and the file behind each.
FILE_NAMES: dict[str, str] = {
    "lm": LM_FILE,
    "mimi": MIMI_FILE,
    "tokenizer": TEXT_TOKENIZER_FILE,
    "config": CONFIG_FILE,
    "voices": VOICES_ARCHIVE,
}
DEFAULT_NEED = ("lm", "mimi", "tokenizer")

_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

_WHAT_A_CHECKPOINT_HOLDS = (
    f"a checkpoint directory must contain {LM_FILE}, {MIMI_FILE} and {TEXT_TOKENIZER_FILE}"
    f" (optional: {CONFIG_FILE}, {VOICES_ARCHIVE} or {VOICES_DIR}/)"
)
_TRY_LOCAL = "pass --checkpoint DIR with a local copy, or try --demo for a tiny random model"


@dataclass
class CheckpointFiles:
    """Local paths of one checkpoint's files.

    Every file named in `resolve_checkpoint(need=...)` is set; others are None when absent (for a hub repo,
    `lm`, `mimi` and `tokenizer` outside `need` are not downloaded and stay None).
    """

    lm: Path | None
    mimi: Path | None
    tokenizer: Path | None
    config: Path | None = None
    voices_dir: Path | None = None
    root: Path | None = None  # the directory holding the files (a hub snapshot folder for repos)
    source: str = ""  # what was asked for: the directory or the repo id


def cache_root() -> Path:
    """Where personaplex caches what it builds: `$PERSONAPLEX_CACHE`, else `$XDG_CACHE_HOME/personaplex`,
    else `~/.cache/personaplex` (the --demo checkpoint, the voices of read-only checkpoints)."""
    base = os.environ.get("PERSONAPLEX_CACHE")
    if base:
        return Path(base).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "personaplex"


# -- resolution ---- --------------------------------------------------------------------------------------------------
def resolve_checkpoint(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    need: Iterable[str] = DEFAULT_NEED,
    progress: bool = True,
    demo: bool = False,
) -> CheckpointFiles:
    """Local paths of the files of `source`, an existing directory or a hub repo id ("owner/name"); with
    `demo`, of the demo checkpoint instead (tiny, random weights, built on first use: see demo.py).

    `need` names the files that must be present, among "lm", "mimi", "tokenizer", "config" and "voices";
    `config.json` and the voices are looked for either way and are None when absent. Repo files are downloaded
    with `huggingface_hub` (progress bars as it shows them unless `progress=False`); with `HF_HUB_OFFLINE=1`
    only the local HF cache is used.
    """
    need = tuple(need)
    unknown = sorted(set(need) - set(FILE_NAMES))
    if unknown:
        raise ValueError(f"unknown checkpoint file kind(s) {unknown}; choose among {', '.join(FILE_NAMES)}")
    if demo:
        from .demo import demo_checkpoint_dir

        source = demo_checkpoint_dir()
        logger.warning("DEMO checkpoint: tiny model with RANDOM weights, its speech is noise (%s)", source)
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return _resolve_local(path.absolute(), need)
    if path.exists():
        raise CheckpointError(
            f"checkpoint {text} is a file, not a directory: pass the directory that holds it;"
            f" {_WHAT_A_CHECKPOINT_HOLDS}"
        )
    if isinstance(source, str) and looks_like_repo_id(source):
        return _resolve_hub(
            source, revision=revision, token=token, cache_dir=cache_dir, need=need, progress=progress
        )
    raise CheckpointError(
        f"checkpoint not found: {text} is neither a local directory nor a hub repo id (owner/name):"
        f" pass an existing directory or a repo id such as {DEFAULT_REPO}, or try --demo"
    )


def looks_like_repo_id(text: str) -> bool:
    """True for "owner/name" strings the hub could accept (checked before any network access)."""
    parts = text.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts):
        return False
    return "--" not in text and ".." not in text and not text.endswith(".git")


def _resolve_local(root: Path, need: tuple[str, ...]) -> CheckpointFiles:
    def present(kind: str) -> Path | None:
        p = root / FILE_NAMES[kind]
        return p if p.is_file() else None

    missing = [FILE_NAMES[k] for k in need if k != "voices" and present(k) is None]
    voices_dir = voices_for(root, present("voices"))
    if "voices" in need and voices_dir is None:
        missing.append(f"{VOICES_ARCHIVE} or {VOICES_DIR}/")
    if missing:
        raise CheckpointError(
            f"checkpoint directory {root} is missing {', '.join(missing)}: {_WHAT_A_CHECKPOINT_HOLDS}"
        )
    return CheckpointFiles(
        lm=present("lm"),
        mimi=present("mimi"),
        tokenizer=present("tokenizer"),
        config=present("config"),
        voices_dir=voices_dir,
        root=root,
        source=str(root),
    )


def _resolve_hub(
    repo_id: str,
    *,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    need: tuple[str, ...],
    progress: bool,
) -> CheckpointFiles:
    # Without a network, hf_hub_download retries for ~25 s before giving up; a DNS look-up tells us in
    # milliseconds, and then only the local cache is used (cached files still resolve).
    offline = "offline mode, HF_HUB_OFFLINE is set" if _hf_offline() else None
    if offline is None and not _hub_host_resolves():
        offline = "no network"
    paths: dict[str, Path | None] = {}
    root: Path | None = None
    voices_dir: Path | None = None
    # Small files first: a gated repo or a missing network shows up before the 16.7 GB download starts.
    for kind in ("tokenizer", "mimi", "config", "voices", "lm"):
        required = kind in need
        if kind in DEFAULT_NEED and not required:
            paths[kind] = None
            continue
        if kind == "voices" and root is not None and list_voices(root / VOICES_DIR):
            voices_dir = root / VOICES_DIR  # already extracted by an earlier run
            continue
        path = _hub_file(
            repo_id,
            FILE_NAMES[kind],
            required=required,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            progress=progress,
            offline=offline,
        )
        paths[kind] = path
        if path is not None and root is None:
            root = path.parent  # the snapshot folder (paths there are links into blobs/; keep them as they are)
        if kind == "voices" and root is not None:
            voices_dir = voices_for(root, path)
            if required and voices_dir is None:
                raise CheckpointError(f"{repo_id} has no voices ({VOICES_ARCHIVE}): pick a PersonaPlex repo")
    return CheckpointFiles(
        lm=paths.get("lm"),
        mimi=paths.get("mimi"),
        tokenizer=paths.get("tokenizer"),
        config=paths.get("config"),
        voices_dir=voices_dir,
        root=root,
        source=repo_id,
    )


def _hf_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub read it at import, or as set in the environment since."""
    from huggingface_hub import constants

    if getattr(constants, "HF_HUB_OFFLINE", False):
        return True
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_host_resolves(timeout: float = 3.0) -> bool:
    """False when the hub's host name does not resolve (no network). True when unsure (proxy, slow DNS)."""
    proxies = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
    if any(os.environ.get(name) for name in proxies):
        return True  # the proxy resolves names, not us
    from huggingface_hub import constants

    host = urllib.parse.urlsplit(getattr(constants, "ENDPOINT", "https://huggingface.co")).hostname
    if not host:
        return True
    answer: list[bool] = []

    def look_up() -> None:
        try:
            socket.getaddrinfo(host, 443)
            answer.append(True)
        except OSError:
            answer.append(False)

    thread = threading.Thread(target=look_up, name="personaplex-dns-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return answer[0] if answer else True


def _hub_file(
    repo_id: str,
    filename: str,
    *,
    required: bool,
    revision: str | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    progress: bool,
    offline: str | None,
) -> Path | None:
    """Download one file (or find it in the HF cache). None when an optional file is absent.

    `offline` is None when online, else why not: then only the local HF cache is looked at.
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    kwargs: dict[str, object] = {}
    if not progress and "tqdm_class" in inspect.signature(hf_hub_download).parameters:
        from huggingface_hub.utils import silent_tqdm

        kwargs["tqdm_class"] = silent_tqdm
    try:
        local = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=offline is not None,  # no network attempt at all, even if HF_HUB_OFFLINE came late
            library_name="personaplex",
            **kwargs,  # type: ignore[arg-type]
        )
    except Exception as error:  # noqa: BLE001 - mapped to one-line errors below, the rest re-raised
        if not required and isinstance(error, EntryNotFoundError):
            # Absent from the repo, or (offline / no network) not in the cache: optional files may be missing.
            logger.debug("optional %s not available from %s: %s", filename, repo_id, error)
            return None
        mapped = _download_error(error, repo_id, filename, revision, offline, cache_dir)
        if mapped is None:
            raise
        raise mapped from error
    return Path(local)


def _download_error(
    error: Exception,
    repo_id: str,
    filename: str,
    revision: str | None,
    offline: str | None,
    cache_dir: str | os.PathLike[str] | None,
) -> CheckpointError | None:
    """One-line CheckpointError for a failed hf_hub_download, or None for errors that are bugs."""
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"https://huggingface.co/{repo_id}"
    login = "set HF_TOKEN or run `hf auth login` (`huggingface-cli login` in older versions)"
    if isinstance(error, GatedRepoError):
        return CheckpointError(f"{repo_id} is gated: accept the licence on {page}, then {login}")
    if isinstance(error, RepositoryNotFoundError):
        return CheckpointError(
            f"hub repo {repo_id} not found (or private and no valid token), and no local directory of that name:"
            f" check the name, {login}, or pass --checkpoint DIR"
        )
    if isinstance(error, RevisionNotFoundError):
        return CheckpointError(f"revision {revision!r} not found in {repo_id}: use a branch, tag or commit of {page}")
    if isinstance(error, RemoteEntryNotFoundError):
        return CheckpointError(
            f"{repo_id} has no {filename}, so it is not a PersonaPlex/Moshi checkpoint"
            f" ({_WHAT_A_CHECKPOINT_HOLDS}): check the repo id or pass --checkpoint DIR"
        )
    if isinstance(error, (LocalEntryNotFoundError, OfflineModeIsEnabled)) or _is_network_error(error):
        why = offline or "no network"
        return CheckpointError(f"cannot download {repo_id} ({why}; {filename} is not in the local cache): {_TRY_LOCAL}")
    if isinstance(error, HfHubHTTPError):
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            return CheckpointError(
                f"not authorised to download {repo_id} (HTTP {status}): accept the licence on {page}, then {login}"
            )
        return CheckpointError(
            f"the hub failed while downloading {filename} from {repo_id} (HTTP {status}): retry later, or {_TRY_LOCAL}"
        )
    if isinstance(error, HFValidationError):
        return CheckpointError(f"invalid hub repo id or revision {repo_id!r} / {revision!r}: {first_line(error)}")
    if isinstance(error, OSError):
        where = cache_dir or "the Hugging Face cache (HF_HOME)"
        return CheckpointError(
            f"could not save {filename} of {repo_id} into {where}: {first_line(error)};"
            " free some disk space or pass another cache directory"
        )
    return None


def _is_network_error(error: BaseException) -> bool:
    """Connection and timeout errors of whichever HTTP client huggingface_hub uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    markers = ("Connect", "Timeout", "Network", "Transport", "Proxy", "RemoteProtocol", "Xet")
    return any(m in cls.__name__ for cls in type(error).__mro__ for m in markers)
