"""Who a slice belongs to, said without saying who: the pseudonym key and the names ctscan writes.

An allow list, not a block list. Of a DICOM or NIfTI file's path only the class folder is ever
written (run folder, report, metrics, ledger, export, TensorBoard, logs, predict's CSV, error and
skip messages, the cache); below it stand names made here:

    COVID/patient-3f9a0c2d81b4/series-77e01c9ab2d3/slice-0b5e2f6a91c7      a DICOM file
    COVID/patient-3f9a0c2d81b4/series-77e01c9ab2d3/slice-0b5e2f6a91c7#4    frame 4 of it
    COVID/volume-5d2c8e1f04a7#12                                            a NIfTI volume's slice
    COVID/file-9c1b7e2d3f60                                                 a file that was skipped

Each is an HMAC-SHA256 under a key that never leaves this machine: it lives in the user's config
folder (mode 0600), and a run records only its fingerprint. Without the key a pseudonym cannot be
tested against a guessed patient ID; with it, `ctscan locate` maps a name back to its file.
Folder and file names of PACS exports hold patient names, IDs, accession numbers and dates in
spellings no block list foresees (another case, `^` as `_`); so none of them is kept. 2-D image
files (PNG, TIFF...) carry no header to read a patient from and keep their paths.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from data_utils.errors import RunFolderError, UserError
from data_utils.files import atomic_write

KEY_FILE_ENV = "CTSCAN_KEY_FILE"
PSEUDONYM_HEX = 12


def default_key_file() -> Path:
    """$CTSCAN_KEY_FILE, else identity.key in ctscan's config folder ($XDG_CONFIG_HOME/ctscan or
    ~/.config/ctscan): not the cache, which users clear and share between machines."""
    if os.environ.get(KEY_FILE_ENV):
        return Path(os.environ[KEY_FILE_ENV]).expanduser()
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "ctscan" / "identity.key"


def load_key(path: Path | None = None) -> bytes:
    """The pseudonym key in `path` (a --key-file: it must exist), else in default_key_file(),
    made there on first use, readable by its owner only."""
    given = path is not None
    path = Path(path).expanduser() if given else default_key_file()
    try:
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        if given:
            raise UserError(f"--key-file {path}: no such file") from None
        with atomic_write(path, "w") as f:
            os.chmod(f.name, 0o600)
            f.write(secrets.token_hex(32))
        return load_key()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read the pseudonym key ({e})") from e
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) < 16:
        raise UserError(f"{path}: not a ctscan pseudonym key (expected 64 hex digits)")
    return key


def use_key_file(path: Path) -> None:
    """--key-file: this process and the ones it starts read the pseudonym key from `path`."""
    if not Path(path).expanduser().is_file():
        raise UserError(f"--key-file {path}: no such file")
    os.environ[KEY_FILE_ENV] = str(Path(path).expanduser().absolute())


def fingerprint(key: bytes) -> str:
    """What a run records of its key: enough to tell two keys apart, nothing to test a guessed
    ID with (an HMAC of a constant; the key itself stays out of reach)."""
    return hmac.new(key, b"ctscan key fingerprint", hashlib.sha256).hexdigest()[:16]


def check_key(recorded: str | None, key: bytes, where: str) -> None:
    """Refuse, in one line, to read a run's data under another key than the one it was made
    with: its split would name every DICOM and NIfTI slice differently."""
    if recorded is not None and recorded != fingerprint(key):
        raise RunFolderError(
            f"{where} was made with pseudonym key {recorded}, but this machine's key "
            f"({default_key_file()}) is {fingerprint(key)}: bring the key file it was made with "
            f"(--key-file FILE or {KEY_FILE_ENV}=FILE)")


def pseudonym(value: str, key: bytes) -> str:
    """A stable stand-in for an identifier: HMAC-SHA256 under `key`, 12 hex digits. Without the
    key nobody can test a guessed ID against it, as one could against a plain hash."""
    return hmac.new(key, value.encode(), hashlib.sha256).hexdigest()[:PSEUDONYM_HEX]


def file_pseudonym(path: Path, key: bytes) -> str:
    """A file's own stand-in, from its path with the folders resolved: the same in a dataset, in
    predict and in explain however the folder was spelled, so `ctscan locate` finds it from any
    of them. (The file itself is not resolved: two links to one file stay two names.)"""
    path = Path(path)
    return pseudonym(f"file:{path.parent.resolve() / path.name}", key)


def stand_in(class_name: str, *parts: tuple[str, str | None]) -> str:
    """A written name: the class folder, then kind-pseudonym parts (those with a value)."""
    named = [f"{kind}-{value}" for kind, value in parts if value]
    return "/".join([class_name, *named] if class_name else named)


def pseudonym_of_name(name: str) -> str | None:
    """The file's pseudonym in a written name (its last slice-, volume- or file- part), or None:
    what `ctscan locate` looks up."""
    last = name.rstrip("/").rsplit("/", 1)[-1].split("#", 1)[0]
    kind, _, value = last.partition("-")
    return value if kind in ("slice", "volume", "file") and len(value) == PSEUDONYM_HEX else None
