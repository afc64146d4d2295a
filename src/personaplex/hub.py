"""Find the files of a checkpoint: a local directory or a Hugging Face hub repo, same file names either way.

`resolve_checkpoint` turns a `--checkpoint` argument into a `CheckpointFiles` of local paths, downloading
from the hub when needed (files already in the local HF cache resolve offline). Voice prompts ship as
`voices.tgz`; it is extracted once, safely, into `voices/` beside it. `find_voice` looks a client-chosen voice
name up among the files listed in that folder and never joins the name onto a path.

Every failure is a `CheckpointError` or `VoiceNotFoundError` with a one-line message that says what to do.
Nothing here runs at import time.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import inspect
import logging
import os
import re
import shutil
import socket
import tarfile
import tempfile
import threading
import urllib.parse
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from personaplex.errors import CheckpointError, VoiceNotFoundError

logger = logging.getLogger(__name__)

# -- released file names ---------------------------------------------------------------------------------------
DEFAULT_REPO = "nvidia/personaplex-7b-v1"
MOSHIKO_REPO = "kyutai/moshiko-pytorch-bf16"  # Moshi-family repos use the same names but carry no voices

LM_FILE = "model.safetensors"
MIMI_FILE = "tokenizer-e351c8d8-checkpoint125.safetensors"
TEXT_TOKENIZER_FILE = "tokenizer_spm_32k_3.model"
VOICES_ARCHIVE = "voices.tgz"  # holds voices/*.pt
VOICES_DIR = "voices"
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

VOICE_AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg")
VOICE_SUFFIXES = (".pt", *VOICE_AUDIO_SUFFIXES)  # lookup order when a name comes without extension
_VOICE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")

# Bounds on what a voices archive may unpack to (the released one is a few MB).
_MAX_VOICE_BYTES = 512 * 2**20
_MAX_VOICES = 4096

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


# -- resolution --------------------------------------------------------------------------------------------------
def resolve_checkpoint(
    source: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    need: Iterable[str] = DEFAULT_NEED,
    progress: bool = True,
) -> CheckpointFiles:
    """Local paths of the files of `source`, an existing directory or a hub repo id ("owner/name").

    `need` names the files that must be present, among "lm", "mimi", "tokenizer", "config" and "voices";
    `config.json` and the voices are looked for either way and are None when absent. Repo files are downloaded
    with `huggingface_hub` (progress bars as it shows them unless `progress=False`); with `HF_HUB_OFFLINE=1`
    only the local HF cache is used.
    """
    need = tuple(need)
    unknown = sorted(set(need) - set(FILE_NAMES))
    if unknown:
        raise ValueError(f"unknown checkpoint file kind(s) {unknown}; choose among {', '.join(FILE_NAMES)}")
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
    voices_dir = _voices_for(root, present("voices"))
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
            voices_dir = _voices_for(root, path)
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
        return CheckpointError(f"invalid hub repo id or revision {repo_id!r} / {revision!r}: {_first_line(error)}")
    if isinstance(error, OSError):
        where = cache_dir or "the Hugging Face cache (HF_HOME)"
        return CheckpointError(
            f"could not save {filename} of {repo_id} into {where}: {_first_line(error)};"
            " free some disk space or pass another cache directory"
        )
    return None


def _is_network_error(error: BaseException) -> bool:
    """Connection and timeout errors of whichever HTTP client huggingface_hub uses."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    markers = ("Connect", "Timeout", "Network", "Transport", "Proxy", "RemoteProtocol", "Xet")
    return any(m in cls.__name__ for cls in type(error).__mro__ for m in markers)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -- voices ------------------------------------------------------------------------------------------------------
def _voices_for(root: Path, archive: Path | None) -> Path | None:
    """The voices folder of a checkpoint: `root/voices` if it holds voices, else `archive` extracted."""
    folder = root / VOICES_DIR
    if list_voices(folder):
        return folder
    if archive is not None:
        return extract_voices(archive, folder)
    return folder if folder.is_dir() else None


def extract_voices(archive: Path, target: Path) -> Path:
    """Extract the `*.pt` voice prompts of `archive` into `target` (or a cache folder if that is read-only).

    Only regular files named `NAME.pt` or `FOLDER/NAME.pt` are written, under their base name. An entry with
    an absolute path, a `..` component, a link or a device makes the whole archive rejected. The cache folder
    is `$PERSONAPLEX_CACHE/voices/<hash>` (default `~/.cache/personaplex`), one per archive content.
    """
    target = Path(target)
    if (target.is_dir() or not target.exists()) and os.access(target.parent, os.W_OK):
        try:
            return _extract_into(archive, target)
        except OSError as error:
            if error.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise CheckpointError(f"cannot extract {archive} into {target}: {_first_line(error)}") from error
    fallback = _fallback_voices_dir(archive)
    if list_voices(fallback):
        return fallback
    try:
        fallback.parent.mkdir(parents=True, exist_ok=True)
        return _extract_into(archive, fallback)
    except OSError as error:
        raise CheckpointError(
            f"cannot extract {archive} ({target.parent} is read-only and {fallback}: {_first_line(error)}):"
            " set PERSONAPLEX_CACHE to a writable folder"
        ) from error


def _extract_into(archive: Path, target: Path) -> Path:
    logger.info("extracting %s into %s", archive, target)
    staging = Path(tempfile.mkdtemp(prefix=".voices-", dir=target.parent))
    try:
        _extract_voice_members(archive, staging)
        try:
            os.rename(staging, target)  # atomic; also replaces an empty target folder
        except OSError:
            target.mkdir(exist_ok=True)  # target already there (maybe a concurrent run): add the files to it
            for item in staging.iterdir():
                os.replace(item, target / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _extract_voice_members(archive: Path, into: Path) -> None:
    count = 0
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:  # one streaming pass; nothing is written outside `into`
                name = _voice_member_name(member, archive)
                if name is None:
                    continue
                count += 1
                if count > _MAX_VOICES or member.size > _MAX_VOICE_BYTES:
                    raise CheckpointError(
                        f"{archive} is unreasonably large ({member.name!r}):"
                        " delete it and download the checkpoint again"
                    )
                source = tar.extractfile(member)
                if source is None:
                    continue
                with source, open(into / name, "wb") as out:
                    shutil.copyfileobj(source, out)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise CheckpointError(
            f"cannot read {archive} ({_first_line(error)}): delete it and download the checkpoint again"
        ) from error


def _voice_member_name(member: tarfile.TarInfo, archive: Path) -> str | None:
    """The file name to write for a safe voice entry, None to skip it; raises on hostile entries."""
    raw = member.name
    parts = [p for p in raw.replace("\\", "/").split("/") if p not in ("", ".")]
    hostile = None
    if "\x00" in raw or raw.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", raw):
        hostile = "an absolute path"
    elif ".." in parts:
        hostile = "a '..' component"
    elif member.issym() or member.islnk():
        hostile = "a link"
    elif member.isdev():
        hostile = "a device or pipe"
    if hostile:
        raise CheckpointError(
            f"refusing to extract {archive}: entry {raw[:80]!r} has {hostile}; delete it and download the"
            f" checkpoint again, or unpack the voices into a {VOICES_DIR}/ folder yourself"
        )
    if not member.isfile() or not 1 <= len(parts) <= 2:
        return None
    base = parts[-1]
    if not base.lower().endswith(".pt") or not is_valid_voice_name(base):
        return None  # e.g. macOS '._NATF0.pt' resource forks, READMEs
    return base


def _fallback_voices_dir(archive: Path) -> Path:
    """A per-archive cache folder, for checkpoints in read-only directories."""
    digest = hashlib.sha256()
    with open(archive, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    base = os.environ.get("PERSONAPLEX_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "personaplex"
    )
    return Path(base) / "voices" / digest.hexdigest()[:16]


def is_valid_voice_name(name: object) -> bool:
    """A plain file name: 1-64 of [A-Za-z0-9_.-], not starting with '.'."""
    return isinstance(name, str) and _VOICE_NAME.fullmatch(name) is not None and not name.startswith(".")


def _voice_files(voices_dir: str | os.PathLike[str] | None) -> dict[str, Path]:
    """File name -> path of the voice files in `voices_dir` (only names `find_voice` accepts)."""
    if voices_dir is None:
        return {}
    folder = Path(voices_dir)
    try:
        entries = list(folder.iterdir())
    except OSError:
        return {}
    return {
        p.name: p
        for p in entries
        if is_valid_voice_name(p.name) and p.suffix.lower() in VOICE_SUFFIXES and p.is_file()
    }


def list_voices(voices_dir: str | os.PathLike[str] | None) -> list[str]:
    """Sorted names (file stems) of the voice prompts (`*.pt`, `*.wav`, `*.flac`, `*.mp3`, `*.ogg`) there."""
    return sorted({Path(name).stem for name in _voice_files(voices_dir)})


def find_voice(name: str, voices_dir: str | os.PathLike[str] | None) -> Path:
    """The file of voice `name` ("NATF0" or "NATF0.pt"), looked up among `list_voices(voices_dir)` only.

    The name is never joined onto a path, so "../x", "/abs" or "a/b" cannot reach outside the folder.
    """
    files = _voice_files(voices_dir)  # lists `voices_dir` only, whatever `name` is
    available = _available(files)
    if not is_valid_voice_name(name):
        shown = repr(name[:64] if isinstance(name, str) else name)
        raise VoiceNotFoundError(
            f"invalid voice name {shown}: use a plain name (letters, digits, '_', '-', '.'); available: {available}"
        )
    if name in files:
        return files[name]
    for suffix in VOICE_SUFFIXES:
        if name + suffix in files:
            return files[name + suffix]
    folded = [p for fname, p in files.items() if fname.lower() in {name.lower() + s for s in ("", *VOICE_SUFFIXES)}]
    if len({p.stem for p in folded}) == 1:
        return sorted(folded, key=lambda p: VOICE_SUFFIXES.index(p.suffix.lower()))[0]
    raise VoiceNotFoundError(f"voice {name!r} not found; available: {available}")


def _available(files: dict[str, Path], limit: int = 40) -> str:
    names = sorted({Path(n).stem for n in files})
    if not names:
        return (
            "none (this checkpoint has no voices/ folder or voices.tgz;"
            " use a PersonaPlex checkpoint or add voice files)"
        )
    shown = ", ".join(names[:limit])
    return shown + (", …" if len(names) > limit else "")
