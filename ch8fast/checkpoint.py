"""Checkpoints: an optimizer's whole state, optionally the parameters, and user metadata, in
one file that survives crashes and can be read with plain NumPy.

The file is an uncompressed ``.npz`` (``numpy.savez``). Its arrays are

* ``state.<i>.<name>``: state array ``name`` of parameter ``i`` (e.g. ``state.0.exp_avg``);
* ``param.<i>``: parameter ``i``, when parameters were saved;
* ``__header__``: a 1-D ``uint8`` array holding a UTF-8 JSON object (see ``_header``).

The header names the format (``"format": "ch8fast-checkpoint"``, ``"format_version": 2``),
the optimizer class (``"optimizer"``), the number of parameters (``"n_params"``), whether
they were saved (``"has_params"``), ``"state_dict"``: every entry of the optimizer's
``state_dict()`` except the arrays of ``"state"`` (class, version, ``storage``,
``nesterov_form``, ``param_groups`` with hyperparameters, schedules as
``{"schedule": {...}}`` and step counters, ...), every array with its shape and dtype
(``"arrays"``, in checksum order; a bfloat16 array has dtype ``"bfloat16"`` and is stored as
its raw bits, ``<u2``, so that NumPy alone reads it), the user's ``extra`` metadata, and
``"checksum": {"algorithm": "sha256", "hexdigest": ...}``: the SHA-256 of

1. the header without its ``"checksum"`` entry, serialized as
   ``json.dumps(h, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
   allow_nan=False).encode("utf-8")``, then
2. the raw bytes (C order, the dtype recorded in the header) of every array, in the order
   of ``"arrays"``.

Writes are atomic: the file is written to a temporary file in the same folder, flushed and
fsynced, moved over the old file with ``os.replace``, and the folder is fsynced. A process
killed at any moment leaves the old checkpoint or the new one, never a torn file; what it
may leave is a temporary file ``.<name>.tmp-<host>-<pid>-<random>`` (a long name
shortened), which loading never reads and the next save to the same path removes once the
process that wrote it is gone.

Version 2 added the ``storage`` entry of state dicts (16-bit parameters, compressed state)
and bfloat16 arrays; version-1 files still load.

Loading never runs code from the file (``numpy.load(..., allow_pickle=False)``), verifies
everything (format, version, checksum, every array against the header, the optimizer
class, the parameter count, shapes and dtypes) before it changes anything, and raises a
ValueError that names the wrong entry.
"""

import hashlib
import json
import os
import re
import socket
import tempfile
import time
import zipfile

import numpy as np

from .storage import is_bfloat16

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "CHECKPOINT_FORMAT",
           "CHECKPOINT_VERSION", "atomic_write", "canonical_json",
           "remove_stale_temporaries"]

CHECKPOINT_FORMAT = "ch8fast-checkpoint"
CHECKPOINT_VERSION = 2
_READS = (1, 2)            # version 1: no "storage" in the state dict, no bfloat16 arrays
_BF16 = "bfloat16"         # the header's dtype of a bfloat16 array, kept as its bits (<u2)
_HEADER = "__header__"
_TMP_MARK = ".tmp-"


# ---------------------------------------------------------------------------------------
# Header and checksum
# ---------------------------------------------------------------------------------------

def _json_default(obj):
    """NumPy scalars in ``extra`` become Python numbers; anything else is refused."""
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serializable")


_JSON_KEY_TYPES = (str, int, float, bool, type(None))


def _plain(obj, where="extra"):
    """``obj`` as the JSON data a reader gets back, with dict keys as strings (as
    ``json`` writes them); two keys that become the same string are refused, since one
    would silently replace the other."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if isinstance(k, (np.integer, np.floating, np.bool_)):
                k = _json_default(k)
            if not isinstance(k, _JSON_KEY_TYPES):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; JSON keys "
                                f"are strings (or numbers, booleans, None)")
            key = k if isinstance(k, str) else json.dumps(k)
            if key in out:
                raise ValueError(f"{where}: keys {key!r} and {k!r} both become the JSON "
                                 f"key {key!r}")
            out[key] = _plain(v, f"{where}[{key!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    return obj


def _canonical(header):
    return json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False, default=_json_default).encode("utf-8")


def canonical_json(obj, where="extra"):
    """``obj`` as the canonical JSON bytes checkpoints are written with, checked as
    ``save_checkpoint`` checks ``extra`` (dict keys become strings, two keys that become
    the same string are refused; NaN and infinities are refused): a TypeError or
    ValueError names the entry. For other writers of checkpoint metadata (the manifest of
    ch8fast.distributed)."""
    return _canonical(_plain(obj, where))


def _checksum(header_wo_checksum, arrays):
    """SHA-256 over the canonical header (without ``checksum``) and each array's bytes, in
    the order of ``header["arrays"]``."""
    h = hashlib.sha256(_canonical(header_wo_checksum))
    for entry in header_wo_checksum["arrays"]:
        a = np.ascontiguousarray(arrays[entry["name"]]).reshape(-1)
        h.update(a.view(np.uint8) if a.size else b"")
    return h.hexdigest()


def _dtype_str(a):
    """The header's dtype of an array: ``a.dtype.str`` (e.g. "<f4": byte order, kind,
    size), or "bfloat16" (ml_dtypes), which the file stores as its raw bits, uint16."""
    return _BF16 if is_bfloat16(a.dtype) else a.dtype.str


def _dtype_name(text):
    return text if text == _BF16 else np.dtype(text).name


def _stored(a):
    """The array as the file stores it (a bfloat16 array as its uint16 bits)."""
    return a.view(np.uint16) if is_bfloat16(a.dtype) else a


def _header(sd, params, extra):
    arrays, entries = {}, []
    for i, st in enumerate(sd["state"]):
        for name, a in st.items():
            key = f"state.{i}.{name}"
            arrays[key] = a
            entries.append({"name": key, "shape": list(a.shape), "dtype": _dtype_str(a)})
    if params is not None:
        for i, p in enumerate(params):
            key = f"param.{i}"
            arrays[key] = _stored(p)
            entries.append({"name": key, "shape": list(p.shape), "dtype": _dtype_str(p)})
    header = {
        "format": CHECKPOINT_FORMAT,
        "format_version": CHECKPOINT_VERSION,
        "optimizer": sd["optimizer"],
        "n_params": len(sd["state"]),
        "has_params": params is not None,
        "state_dict": {k: v for k, v in sd.items() if k != "state"},
        "arrays": entries,
    }
    try:
        header["extra"] = _plain(extra)
        text = _canonical(header)
    except (TypeError, ValueError) as e:
        raise type(e)(f"save_checkpoint: the header (extra metadata or hyperparameters) "
                      f"is not plain JSON: {e}") from None
    header = json.loads(text)               # exactly what a reader will see
    header["checksum"] = {"algorithm": "sha256",
                          "hexdigest": _checksum(header, arrays)}
    arrays[_HEADER] = np.frombuffer(_canonical(header), dtype=np.uint8)
    return arrays


# ---------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------

def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:                          # e.g. Windows: folders cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _pid_alive(pid):
    """Whether process ``pid`` still runs. A zombie (exited, not yet reaped by its parent)
    answers signal 0 but writes nothing more: it counts as gone, where /proc tells."""
    if pid == os.getpid():
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _temp_base(base):
    """``base`` as a temporary name holds it: a long name is shortened (its start and a
    hash), so that the temporary name fits in 255 bytes whenever ``base`` does."""
    if len(base.encode()) > 100:
        digest = hashlib.sha256(base.encode("utf-8", "surrogateescape")).hexdigest()[:16]
        base = base.encode()[:40].decode("utf-8", "ignore") + "~" + digest
    return base


def _host_tag():
    return (re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host")[:32]


def _temp_prefix(base):
    """``.<base>.tmp-<host>-``: a temporary file names its machine, then its process."""
    return f".{_temp_base(base)}{_TMP_MARK}{_host_tag()}-"


_TEMP_NAME = re.compile(r"\.(?P<base>.+)" + re.escape(_TMP_MARK) +
                        r"(?P<host>[A-Za-z0-9_.]+)-(?P<pid>[0-9]+)-[^-]*")


def remove_stale_temporaries(folder, pattern, max_age=None):
    """Remove the temporary files that :func:`atomic_write` left in ``folder`` for files
    whose name matches the regular expression ``pattern`` (whole name) and whose writer is
    gone: written on this machine by a process that no longer exists, or (on any machine)
    not modified for ``max_age`` seconds (None: never by age). A temporary file of a save
    under way is never removed: its process is alive and it is being written. Returns the
    names removed."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    host, now, removed = _host_tag(), time.time(), []
    for name in names:
        m = _TEMP_NAME.fullmatch(name)
        if m is None or not re.fullmatch(pattern, m["base"]):
            continue
        path = os.path.join(folder, name)
        stale = m["host"] == host and not _pid_alive(int(m["pid"]))
        if not stale and max_age is not None:
            try:
                stale = now - os.stat(path).st_mtime > max_age
            except OSError:
                continue
        if stale:
            try:
                os.remove(path)
                removed.append(name)
            except OSError:
                pass
    return removed


def _remove_stale_temps(folder, base):
    """Remove this machine's ``.<base>.tmp-<host>-<pid>-*`` files whose process no longer
    exists (those of other machines sharing the folder are left alone)."""
    remove_stale_temporaries(folder, re.escape(_temp_base(base)))


def _new_file_mode():
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path, write):
    """Write a file atomically: ``write(f)`` fills a temporary file in the same folder
    (binary mode), which is flushed, fsynced and renamed over ``path``, and the folder is
    fsynced. A crash at any moment leaves the old file or the new one; an exception
    removes the temporary file and leaves the old file as it was. The new file keeps the
    old one's permissions (else the umask's)."""
    path = _path(path)
    folder, base = os.path.split(os.path.abspath(path))
    _remove_stale_temps(folder, base)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{_temp_prefix(base)}{os.getpid()}-")
    try:
        if hasattr(os, "fchmod"):            # mkstemp makes 0600
            try:
                mode = os.stat(path).st_mode & 0o777
            except OSError:
                mode = _new_file_mode()
            os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(folder)


def _path(path):
    """A path given as str, bytes or os.PathLike, as str."""
    try:
        return os.fsdecode(os.fspath(path))
    except TypeError:
        raise TypeError(f"path must be a str, bytes or os.PathLike, got "
                        f"{type(path).__name__}") from None


def _check_params(params, what):
    if params is None:
        return None
    if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
        raise TypeError(f"{what}: params must be a list or tuple of arrays, got "
                        f"{type(params).__name__}")
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"{what}: params[{i}] must be a numpy.ndarray, got "
                            f"{type(p).__name__}")
    return list(params)


def _check_optimizer(optimizer, what):
    for name in ("state_dict", "load_state_dict"):
        if not callable(getattr(optimizer, name, None)):
            raise TypeError(f"{what}: expected a ch8fast optimizer, got "
                            f"{type(optimizer).__name__}")


def save_checkpoint(path, optimizer, params=None, extra=None):
    """Write ``optimizer``'s state, optionally ``params`` and JSON-able ``extra`` metadata,
    atomically to ``path`` (used as given: no suffix is added).

    ``params``: None, or a list of arrays to save with the state (typically the arrays the
    optimizer updates; they are saved as they are, so in the shifted Nesterov form they
    hold the interim point, which is what resuming needs). ``extra``: anything
    ``json.dumps`` accepts (NumPy scalars are converted), e.g.
    ``{"sampler": sampler.state_dict(), "epoch": 3}``; NaN and infinities are refused.

    The old file at ``path``, if any, is replaced only once the new one is complete and on
    disk; a crash at any moment leaves one or the other.
    """
    _check_optimizer(optimizer, "save_checkpoint")
    params = _check_params(params, "save_checkpoint")
    path = _path(path)
    snapshot = getattr(optimizer, "snapshot", None)
    if snapshot is None:                       # another object with a state dict
        _write(path, optimizer.state_dict(), params, extra)
        return
    # The optimizer is held still while the file is written (a step in another thread
    # waits), with the arrays as they are between steps (inside at_theta() too).
    with snapshot(params) as (sd, between):
        _write(path, sd, between, extra)


def _write(path, sd, params, extra):
    if params is not None and len(params) != len(sd["state"]):
        raise ValueError(f"save_checkpoint: got {len(params)} params, the optimizer has "
                         f"{len(sd['state'])}")
    arrays = _header(sd, params, extra)
    atomic_write(path, lambda f: np.savez(f, **arrays))


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------

def _bad(path, msg):
    return ValueError(f"checkpoint {path!r}: {msg}")


def _expect(cond, path, msg):
    if not cond:
        raise _bad(path, msg)


def read_checkpoint(path):
    """Read and verify a checkpoint file without an optimizer: returns
    ``(header, arrays)``, the parsed JSON header and a dict of the arrays by name.

    Raises ValueError (naming the entry) for a file that is not a complete, unmodified
    checkpoint of a supported version; FileNotFoundError if there is none.
    """
    path = _path(path)
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise _bad(path, "not an .npz file (a single .npy array?)")
        with npz:
            names = list(npz.files)
            _expect(_HEADER in names, path, f"no {_HEADER!r} entry: not a ch8fast "
                    f"checkpoint")
            members = {n: npz[n] for n in names}
            for n, a in members.items():     # a member that is not .npy comes as bytes
                _expect(isinstance(a, np.ndarray), path,
                        f"entry {n!r} is not a NumPy array")
            raw = members.pop(_HEADER)
            _expect(raw.dtype == np.uint8 and raw.ndim == 1, path,
                    f"{_HEADER!r} must be a 1-D uint8 array, got {raw.dtype} {raw.shape}")
            arrays = members
    except FileNotFoundError:
        raise
    except ValueError as e:
        if str(e).startswith("checkpoint "):
            raise
        raise _bad(path, f"not a readable .npz file ({e})") from None
    except (OSError, EOFError, zipfile.BadZipFile, KeyError, RuntimeError,
            NotImplementedError, OverflowError, MemoryError) as e:
        raise _bad(path, f"not a readable .npz file ({type(e).__name__}: {e})") from None

    try:
        header = json.loads(raw.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _bad(path, f"{_HEADER!r} is not UTF-8 JSON ({type(e).__name__}: {e})") \
            from None
    _expect(isinstance(header, dict), path, f"{_HEADER!r} must be a JSON object")
    _expect(header.get("format") == CHECKPOINT_FORMAT, path,
            f"header['format'] is {header.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    version = header.get("format_version")
    _expect(version in _READS and type(version) is int, path,
            f"header['format_version'] is {version!r}; this ch8fast reads versions "
            f"{list(_READS)}")
    for key, typ in (("optimizer", str), ("n_params", int), ("has_params", bool),
                     ("state_dict", dict), ("arrays", list), ("checksum", dict)):
        _expect(key in header, path, f"header has no {key!r} entry")
        _expect(type(header[key]) is typ, path,
                f"header[{key!r}] must be a {typ.__name__}, got "
                f"{type(header[key]).__name__}")
    _expect("extra" in header, path, "header has no 'extra' entry")
    _expect("state" not in header["state_dict"], path,
            "header['state_dict'] must not hold 'state' (the arrays hold it)")

    # Every array listed, with its shape and dtype; nothing unlisted.
    listed = []
    for j, e in enumerate(header["arrays"]):
        ok = (isinstance(e, dict) and set(e) == {"name", "shape", "dtype"}
              and isinstance(e["name"], str) and isinstance(e["dtype"], str)
              and isinstance(e["shape"], list)
              and all(type(s) is int and s >= 0 for s in e["shape"]))
        _expect(ok, path, f"header['arrays'][{j}] is malformed: {e!r}")
        listed.append(e["name"])
        _expect(e["name"] in arrays, path,
                f"array {e['name']!r} is listed in the header but missing from the file")
        a = arrays[e["name"]]
        stored = "<u2" if e["dtype"] == _BF16 and version >= 2 else e["dtype"]
        _expect(a.dtype.str == stored, path,
                f"array {e['name']!r} has dtype {a.dtype.str}, the header says "
                f"{e['dtype']}")
        _expect(list(a.shape) == e["shape"], path,
                f"array {e['name']!r} has shape {tuple(a.shape)}, the header says "
                f"{tuple(e['shape'])}")
    _expect(len(set(listed)) == len(listed), path, "header['arrays'] repeats a name")
    unlisted = sorted(set(arrays) - set(listed))
    _expect(not unlisted, path, f"array(s) {unlisted} are not listed in the header")

    cs = header["checksum"]
    _expect(cs.get("algorithm") == "sha256" and isinstance(cs.get("hexdigest"), str), path,
            f"header['checksum'] is malformed: {cs!r}")
    rest = {k: v for k, v in header.items() if k != "checksum"}
    try:
        digest = _checksum(rest, arrays)
    except (TypeError, ValueError, RecursionError) as e:
        raise _bad(path, f"header cannot be checked ({e})") from None
    _expect(digest == cs["hexdigest"], path,
            f"checksum mismatch: the file is corrupt or was modified (sha256 "
            f"{digest}, header says {cs['hexdigest']})")
    return header, arrays


def load_checkpoint(path, optimizer, params=None):
    """Restore a checkpoint written by :func:`save_checkpoint` into ``optimizer`` (and into
    ``params``, copied in place, when given), and return its ``extra`` metadata.

    Everything is verified before anything is written: the file (format, version,
    checksum), the optimizer class, the number of parameters and every array's shape and
    dtype. On any mismatch a ValueError (TypeError for wrong argument types) names the
    entry, and neither the optimizer nor the parameters change.
    """
    _check_optimizer(optimizer, "load_checkpoint")
    params = _check_params(params, "load_checkpoint")
    path = _path(path)
    header, arrays = read_checkpoint(path)

    kind = type(optimizer).__name__
    _expect(header["optimizer"] == kind, path,
            f"it holds the state of the optimizer {header['optimizer']}, not of "
            f"{kind}")
    stored = header["state_dict"].get("storage")
    ours = getattr(optimizer, "storage", None)
    if isinstance(stored, dict) and isinstance(ours, dict):
        for k in ("state_format", "param_mode"):
            _expect(stored.get(k) == ours.get(k), path,
                    f"it was saved with {k}={stored.get(k)!r}, the optimizer has "
                    f"{k}={ours.get(k)!r}")
    mine = getattr(optimizer, "state", None)
    if mine is None:
        mine = optimizer.state_dict()["state"]
    n = len(mine)
    _expect(header["n_params"] == n, path,
            f"it holds {header['n_params']} parameters, the optimizer has {n}")
    missing = [f"param.{i}" for i in range(n) if header["has_params"]
               and f"param.{i}" not in arrays]
    _expect(not missing, path, f"header['has_params'] is true but {missing} are missing")
    state = []
    for i, st in enumerate(mine):
        saved = {}
        prefix = f"state.{i}."
        names = {k[len(prefix):] for k in arrays if k.startswith(prefix)}
        _expect(names == set(st), path,
                f"parameter {i} has state entries {sorted(names)} in the file, the "
                f"optimizer keeps {sorted(st)}")
        for name, a in st.items():
            b = arrays[prefix + name]
            _expect(b.shape == a.shape and b.dtype == a.dtype, path,
                    f"array {prefix + name!r} has shape {b.shape} and dtype {b.dtype}, the "
                    f"optimizer's is {a.shape} {a.dtype}")
            saved[name] = b
        state.append(saved)
    known = {f"state.{i}.{k}" for i, st in enumerate(mine) for k in st}
    if header["has_params"]:
        known |= {f"param.{i}" for i in range(n)}
    stray = sorted(set(arrays) - known)
    _expect(not stray, path, f"unexpected array(s) {stray}")
    if params is not None:
        _expect(header["has_params"], path, "it holds no parameters (saved with "
                "params=None), but params were given")
        _expect(len(params) == n, path,
                f"it holds {n} parameters, {len(params)} params were given")
        dtypes = {e["name"]: e["dtype"] for e in header["arrays"]}
        for i, p in enumerate(params):
            b = arrays[f"param.{i}"]
            _expect(b.shape == p.shape and dtypes[f"param.{i}"] == _dtype_str(p), path,
                    f"array 'param.{i}' has shape {b.shape} and dtype "
                    f"{_dtype_name(dtypes[f'param.{i}'])}, params[{i}] is {p.shape} "
                    f"{p.dtype}")
            if not p.flags.writeable:
                raise ValueError(f"load_checkpoint: params[{i}] is read-only")
    sd = dict(header["state_dict"], state=state)
    try:
        optimizer.load_state_dict(sd)        # verifies everything, then applies
    except (TypeError, ValueError) as e:
        raise _bad(path, str(e)) from None
    if params is not None:
        for i, p in enumerate(params):
            np.copyto(_stored(p), arrays[f"param.{i}"], casting="no")
    return header["extra"]
