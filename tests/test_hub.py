"""Checkpoint resolution, voices.tgz extraction, offline hub behaviour and voice lookup (no network)."""

from __future__ import annotations

import io
import os
import tarfile
import time
from pathlib import Path

import pytest

from personaplex import hub
from personaplex.errors import CheckpointError, PersonaplexError, VoiceNotFoundError
from personaplex.hub import (
    CONFIG_FILE,
    LM_FILE,
    MIMI_FILE,
    TEXT_TOKENIZER_FILE,
    VOICES_ARCHIVE,
    find_voice,
    list_voices,
    resolve_checkpoint,
)

VOICE_BYTES = {"NATF0": b"natf0-prompt", "NATM1": b"natm1-prompt", "VARF4": b"varf4-prompt"}


def _make_checkpoint(root: Path, *, config: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in (LM_FILE, MIMI_FILE, TEXT_TOKENIZER_FILE):
        (root / name).write_bytes(name.encode())
    if config:
        (root / CONFIG_FILE).write_text("{}")
    return root


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"x", **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in fields.items():
        setattr(info, key, value)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def _write_voices_tgz(path: Path, prefix: str = "voices/") -> Path:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, prefix.rstrip("/") or ".", type=tarfile.DIRTYPE, size=0)
        for name, data in VOICE_BYTES.items():
            _add(tar, f"{prefix}{name}.pt", data)
        _add(tar, f"{prefix}._NATF0.pt", b"apple double")  # skipped: hidden
        _add(tar, f"{prefix}README.txt", b"not a voice")  # skipped: not .pt
        _add(tar, f"{prefix}a/b/NATF9.pt", b"nested")  # skipped: too deep
    return path


def _one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    message = str(error.value)
    assert "\n" not in message, message
    return message


# -- local directories -------------------------------------------------------------------------------------------
def test_local_directory_resolves(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    files = resolve_checkpoint(root)
    assert files.lm == root / LM_FILE and files.mimi == root / MIMI_FILE
    assert files.tokenizer == root / TEXT_TOKENIZER_FILE and files.config == root / CONFIG_FILE
    assert files.voices_dir is None and files.root == root and files.source == str(root)


def test_local_directory_given_as_string_and_without_config(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt", config=False)
    files = resolve_checkpoint(str(root))
    assert files.config is None and files.lm == root / LM_FILE


def test_missing_file_is_named(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    (root / MIMI_FILE).unlink()
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(root)
    message = _one_line(error)
    assert str(root) in message and f"missing {MIMI_FILE}" in message and "must contain" in message
    assert isinstance(error.value, PersonaplexError)


def test_need_limits_what_is_required(tmp_path: Path) -> None:
    root = tmp_path / "only-tokenizer"
    root.mkdir()
    (root / TEXT_TOKENIZER_FILE).write_bytes(b"spm")
    files = resolve_checkpoint(root, need=("tokenizer",))
    assert files.tokenizer == root / TEXT_TOKENIZER_FILE and files.lm is None
    with pytest.raises(CheckpointError, match="voices"):
        resolve_checkpoint(root, need=("tokenizer", "voices"))
    with pytest.raises(ValueError, match="unknown checkpoint file kind"):
        resolve_checkpoint(root, need=("weights",))


@pytest.mark.parametrize("source", ["./no-such-dir", "no_such_thing", "a/b/c", "../x"])
def test_neither_directory_nor_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(source)
    message = _one_line(error)
    assert "checkpoint not found" in message and "neither a local directory nor a hub repo id" in message


def test_file_instead_of_directory(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="is a file, not a directory"):
        resolve_checkpoint(root / LM_FILE)


# -- voices ------------------------------------------------------------------------------------------------------
def test_voices_folder_is_used(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    (root / "voices").mkdir()
    (root / "voices" / "NATF0.pt").write_bytes(b"a")
    (root / "voices" / "custom.wav").write_bytes(b"b")
    files = resolve_checkpoint(root)
    assert files.voices_dir == root / "voices"
    assert list_voices(files.voices_dir) == ["NATF0", "custom"]


@pytest.mark.parametrize("prefix", ["voices/", "./", ""])
def test_voices_tgz_is_extracted(tmp_path: Path, prefix: str) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    _write_voices_tgz(root / VOICES_ARCHIVE, prefix)
    files = resolve_checkpoint(root)
    assert files.voices_dir == root / "voices"
    assert list_voices(files.voices_dir) == sorted(VOICE_BYTES)
    for name, data in VOICE_BYTES.items():
        assert find_voice(name, files.voices_dir).read_bytes() == data
    assert sorted(p.name for p in (root / "voices").iterdir()) == [f"{n}.pt" for n in sorted(VOICE_BYTES)]
    assert not list(root.glob(".voices-*"))  # staging folder removed
    # A second resolution reuses the extracted folder.
    (root / "voices" / "NATF0.pt").write_bytes(b"kept")
    assert find_voice("NATF0", resolve_checkpoint(root).voices_dir).read_bytes() == b"kept"


def _hostile_archive(path: Path, kind: str) -> None:
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "voices/NATF0.pt", b"fine")
        if kind == "dotdot":
            _add(tar, "../x.pt", b"escape")
        elif kind == "dotdot-inside":
            _add(tar, "voices/../../x.pt", b"escape")
        elif kind == "absolute":
            _add(tar, str(path.parent.parent / "x.pt"), b"escape")
        elif kind == "symlink":
            _add(tar, "voices/x.pt", type=tarfile.SYMTYPE, linkname="/etc/passwd", size=0)
        elif kind == "hardlink":
            _add(tar, "voices/x.pt", type=tarfile.LNKTYPE, linkname="/etc/passwd", size=0)
        elif kind == "device":
            _add(tar, "voices/x.pt", type=tarfile.CHRTYPE, size=0)


@pytest.mark.parametrize("kind", ["dotdot", "dotdot-inside", "absolute", "symlink", "hardlink", "device"])
def test_hostile_voices_archive_is_rejected(tmp_path: Path, kind: str) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    _hostile_archive(root / VOICES_ARCHIVE, kind)
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint(root)
    assert "refusing to extract" in _one_line(error)
    assert not (tmp_path / "x.pt").exists() and not (root / "x.pt").exists()
    assert not (root / "voices").exists()  # nothing half-extracted
    assert not list(root.glob(".voices-*"))


def test_corrupt_voices_archive(tmp_path: Path) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    (root / VOICES_ARCHIVE).write_bytes(b"this is not a tarball")
    with pytest.raises(CheckpointError, match="cannot read .*download the checkpoint again"):
        resolve_checkpoint(root)


def test_read_only_checkpoint_extracts_into_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _make_checkpoint(tmp_path / "ckpt")
    _write_voices_tgz(root / VOICES_ARCHIVE)
    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSONAPLEX_CACHE", str(cache))
    real_access = os.access
    monkeypatch.setattr(hub.os, "access", lambda p, mode: False if Path(p) == root else real_access(p, mode))
    files = resolve_checkpoint(root)
    assert files.voices_dir is not None and cache in files.voices_dir.parents
    assert list_voices(files.voices_dir) == sorted(VOICE_BYTES) and not (root / "voices").exists()
    assert resolve_checkpoint(root).voices_dir == files.voices_dir  # reused, keyed by the archive's content


# -- hub repos, offline -----------------------------------------------------------------------------------------
@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


def test_repo_id_offline_fails_fast_with_one_line(tmp_path: Path, offline: None) -> None:
    start = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("nvidia/personaplex-7b-v1", cache_dir=tmp_path / "hf", progress=False)
    assert time.monotonic() - start < 5
    message = _one_line(error)
    assert message.startswith("cannot download nvidia/personaplex-7b-v1 (offline mode")
    assert "--checkpoint DIR" in message and "--demo" in message


def test_offline_env_set_after_import_is_honoured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="cannot download"):
        resolve_checkpoint("kyutai/moshiko-pytorch-bf16", cache_dir=tmp_path / "hf")


def _populate_hf_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs/<etag>, snapshots/<commit>/<file> -> blob, refs/main."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def test_cached_repo_resolves_offline(tmp_path: Path, offline: None) -> None:
    voices = _write_voices_tgz(tmp_path / "voices.tgz").read_bytes()
    cache = tmp_path / "hf"
    snapshot = _populate_hf_cache(
        cache,
        "nvidia/personaplex-7b-v1",
        {LM_FILE: b"lm", MIMI_FILE: b"mimi", TEXT_TOKENIZER_FILE: b"spm", VOICES_ARCHIVE: voices},
    )
    files = resolve_checkpoint("nvidia/personaplex-7b-v1", cache_dir=cache, progress=False)
    assert files.lm == snapshot / LM_FILE and files.lm.read_bytes() == b"lm"
    assert files.mimi == snapshot / MIMI_FILE and files.tokenizer == snapshot / TEXT_TOKENIZER_FILE
    assert files.config is None  # optional and not cached: absent, not an error
    assert files.root == snapshot and files.source == "nvidia/personaplex-7b-v1"
    assert files.voices_dir == snapshot / "voices" and list_voices(files.voices_dir) == sorted(VOICE_BYTES)


def test_cached_repo_missing_a_required_file(tmp_path: Path, offline: None) -> None:
    cache = tmp_path / "hf"
    _populate_hf_cache(cache, "kyutai/moshiko-pytorch-bf16", {MIMI_FILE: b"mimi", TEXT_TOKENIZER_FILE: b"spm"})
    with pytest.raises(CheckpointError, match=f"cannot download .*{LM_FILE} is not in the local cache"):
        resolve_checkpoint("kyutai/moshiko-pytorch-bf16", cache_dir=cache)
    files = resolve_checkpoint("kyutai/moshiko-pytorch-bf16", cache_dir=cache, need=("mimi", "tokenizer"))
    assert files.lm is None and files.voices_dir is None and files.mimi is not None


def test_no_network_uses_the_cache_without_retrying(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not in offline mode, but the hub's name does not resolve: no 25 s of retries, the cache still works."""
    import socket

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)

    def no_dns(*args: object, **kwargs: object) -> None:
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(hub.socket, "getaddrinfo", no_dns)
    start = time.monotonic()
    with pytest.raises(CheckpointError) as error:
        resolve_checkpoint("nvidia/personaplex-7b-v1", cache_dir=tmp_path / "empty")
    assert time.monotonic() - start < 5
    assert _one_line(error).startswith("cannot download nvidia/personaplex-7b-v1 (no network;")
    cache = tmp_path / "hf"
    snapshot = _populate_hf_cache(
        cache, "nvidia/personaplex-7b-v1", {LM_FILE: b"lm", MIMI_FILE: b"mimi", TEXT_TOKENIZER_FILE: b"spm"}
    )
    assert resolve_checkpoint("nvidia/personaplex-7b-v1", cache_dir=cache).lm == snapshot / LM_FILE


def _http_error(cls: type, status: int) -> Exception:
    import httpx2

    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/x"))
    return cls("boom", response=response)


def _hub_errors() -> list[tuple[Exception, str]]:
    from huggingface_hub import errors

    return [
        (_http_error(errors.GatedRepoError, 401), "is gated: accept the licence on https://huggingface.co/"),
        (_http_error(errors.RepositoryNotFoundError, 404), "not found"),
        (_http_error(errors.RemoteEntryNotFoundError, 404), f"has no {TEXT_TOKENIZER_FILE}"),
        (_http_error(errors.HfHubHTTPError, 401), "not authorised"),
        (_http_error(errors.HfHubHTTPError, 503), "retry later"),
        (errors.LocalEntryNotFoundError("no connection\nsecond line"), "cannot download owner/name (no network"),
        (ConnectionError("refused"), "cannot download owner/name (no network"),
    ]


@pytest.mark.parametrize("index", range(7))
def test_hub_errors_map_to_one_line(monkeypatch: pytest.MonkeyPatch, index: int) -> None:
    pytest.importorskip("httpx2")
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    error, expected = _hub_errors()[index]

    def fail(*args: object, **kwargs: object) -> str:
        raise error

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    monkeypatch.setattr(hub, "_hub_host_resolves", lambda: True)
    with pytest.raises(CheckpointError) as caught:
        resolve_checkpoint("owner/name")
    assert expected in _one_line(caught)


def test_optional_files_absent_from_repo_are_none(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("httpx2")
    import huggingface_hub
    from huggingface_hub import errors

    snapshot = _make_checkpoint(tmp_path / "snap", config=False)

    def download(repo_id: str, filename: str, **kwargs: object) -> str:
        assert kwargs["local_files_only"] is False
        if filename in (CONFIG_FILE, VOICES_ARCHIVE):
            raise _http_error(errors.RemoteEntryNotFoundError, 404)
        return str(snapshot / filename)

    monkeypatch.setattr(hub, "_hf_offline", lambda: False)
    monkeypatch.setattr(hub, "_hub_host_resolves", lambda: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    files = resolve_checkpoint("kyutai/moshiko-pytorch-bf16")
    assert files.lm == snapshot / LM_FILE and files.config is None and files.voices_dir is None


# -- voice lookup ------------------------------------------------------------------------------------------------
@pytest.fixture
def voices_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "ckpt" / "voices"
    folder.mkdir(parents=True)
    for name in VOICE_BYTES:
        (folder / f"{name}.pt").write_bytes(VOICE_BYTES[name])
    (folder / "mine.wav").write_bytes(b"RIFF")
    (folder / "notes.txt").write_text("not a voice")
    (folder / ".hidden.pt").write_bytes(b"hidden")
    # Files a joined path could reach: they must never be returned.
    (tmp_path / "ckpt" / "secret.pt").write_bytes(b"secret")
    (tmp_path / "passwd").write_text("root:x:0:0")
    return folder


def test_list_and_find_voices(voices_dir: Path) -> None:
    assert list_voices(voices_dir) == ["NATF0", "NATM1", "VARF4", "mine"]
    assert find_voice("NATF0", voices_dir) == voices_dir / "NATF0.pt"
    assert find_voice("NATF0.pt", voices_dir) == voices_dir / "NATF0.pt"
    assert find_voice("mine", voices_dir) == voices_dir / "mine.wav"
    assert find_voice("natf0", voices_dir) == voices_dir / "NATF0.pt"  # unique case-insensitive match
    assert list_voices(voices_dir.parent / "nowhere") == [] and list_voices(None) == []


@pytest.mark.parametrize(
    "name",
    ["../secret", "../secret.pt", "../../passwd", "../etc/passwd", "/etc/passwd", "a/b", "..", ".", ".hidden",
     ".hidden.pt", "NATF0\x00", "NATF0\n", "NAT F0", "", "x" * 65, "C:\\voices\\NATF0", "notes.txt"],
)
def test_hostile_voice_names_are_rejected(voices_dir: Path, name: str) -> None:
    with pytest.raises(VoiceNotFoundError) as error:
        find_voice(name, voices_dir)
    message = _one_line(error)
    assert "available: NATF0, NATM1, VARF4, mine" in message
    assert "secret" not in message.replace(repr(name[:64]), "")


def test_unknown_voice_lists_available(voices_dir: Path) -> None:
    with pytest.raises(VoiceNotFoundError) as error:
        find_voice("NATF9", voices_dir)
    assert _one_line(error) == "voice 'NATF9' not found; available: NATF0, NATM1, VARF4, mine"


def test_no_voices_at_all() -> None:
    with pytest.raises(VoiceNotFoundError, match="available: none"):
        find_voice("NATF0", None)
