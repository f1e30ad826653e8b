"""Sharded checkpoints of a DataParallel: one ch8fast checkpoint file per shard and a
manifest, written and read with :mod:`ch8fast.checkpoint` (atomic, checksummed).

A folder holds ``manifest.json`` and the files it names, ``shard-<save id>-<r>-of-<p>.npz``
(one per rank when the state is sharded, one from rank 0 otherwise). A save writes the
shards, then the manifest, then removes the files of earlier saves: until the new manifest
is in place the previous save stays complete. Each save also removes the temporary files
that killed saves left (``.shard-....npz.tmp-<host>-<pid>-...``): those written on this
host by a process that no longer exists (a zombie, dead but not yet reaped by its parent,
counts as gone where /proc tells), and those of any host untouched for a day.

Every rank must pass the same folder: the ranks compare their folders (as absolute paths)
and rank 0's save id in one allgather, which no rank completes alone, before anything is
written. A load compares what every rank read (the save id and a digest of the manifest):
ranks that read different checkpoints, even of as many steps, are refused.
"""

import hashlib
import json
import math
import os
import secrets

import numpy as np

from .. import storage
from ..checkpoint import (atomic_write, canonical_json, read_checkpoint,
                          remove_stale_temporaries, save_checkpoint)
from .collectives import by_value, collective_check

__all__ = ["DIST_CHECKPOINT_FORMAT", "DIST_CHECKPOINT_VERSION", "MANIFEST",
           "STALE_TEMPORARY_AGE", "save", "load"]

DIST_CHECKPOINT_FORMAT = "ch8fast-distributed-checkpoint"
DIST_CHECKPOINT_VERSION = 1
MANIFEST = "manifest.json"
STALE_TEMPORARY_AGE = 24 * 3600.0     # seconds: a temporary file older than this is stale
_OWN_FILES = r"shard-[0-9a-f]+-[0-9]{5}-of-[0-9]{5}\.npz|" + MANIFEST.replace(".", r"\.")
SCALES = ".absmax"        # the state entry of an 8-bit state's scales: name + SCALES


def shard_file(save_id, r, world):
    return f"shard-{save_id}-{r:05d}-of-{world:05d}.npz"


def arena_layout(arena):
    """``[[name, shape, offset], ...]`` of a FlatParams (None for an arena without
    names): compared by DataParallel() across ranks and by load() with the checkpoint."""
    if all(hasattr(arena, k) for k in ("names", "shapes", "offsets")):
        return [[n, list(s), int(o)] for n, s, o in zip(arena.names, arena.shapes,
                                                         arena.offsets)]
    return None


def save(dp, path, extra=None):
    """:meth:`DataParallel.save`."""
    coll, rank, world = dp._coll, dp.rank, dp.world
    try:
        folder = os.path.abspath(os.fspath(path))
    except TypeError:
        folder = None                        # refused by the argument check below
    # An allgather, not a broadcast from rank 0: rank 0 cannot complete it alone (a save()
    # on rank 0 only would leave its id waiting for the others' next save, which would
    # then write shards under it)
    everyone = coll.allgather("the save id and folder check of save()",
                              (secrets.token_hex(8) if rank == 0 else None, folder,
                               dp.steps + dp.skipped_steps))
    save_id = everyone[0][0]
    folders = by_value([f for _, f, _ in everyone])
    counts = by_value([c for _, _, c in everyone])
    if len(folders) > 1:
        raise ValueError("DataParallel.save(): the ranks passed different folders: " +
                         ", ".join(f"rank(s) {ranks}: {f!r}" for f, ranks in folders) +
                         " (every rank must pass the same folder, compared as an absolute "
                         "path)")
    if len(counts) > 1:
        raise ValueError("DataParallel.save(): the ranks are out of step: " + ", ".join(
            f"rank(s) {ranks} had made {c} steps" for c, ranks in counts) +
            " (their shards would mix two points of the run)")
    if dp.shard_state:
        shards = [{"file": shard_file(save_id, r, world), "lo": dp.bounds[r],
                   "hi": dp.bounds[r + 1]} for r in range(world)]
        mine = shards[rank]
    else:
        shards = [{"file": shard_file(save_id, 0, 1), "lo": 0, "hi": dp.flat.size}]
        mine = shards[0] if rank == 0 else None
    norm = dp.last_grad_norm
    manifest = {
        "format": DIST_CHECKPOINT_FORMAT, "format_version": DIST_CHECKPOINT_VERSION,
        "save_id": save_id, "optimizer": type(dp.optimizer).__name__,
        "dtype": dp.flat.dtype.str, "size": int(dp.flat.size),
        "layout": arena_layout(dp.arena), "world_size": world,
        "shard_state": dp.shard_state, "shards": shards,
        "steps": dp.steps, "skipped_steps": dp.skipped_steps,
        "last_grad_norm": norm if norm is None or math.isfinite(norm) else repr(norm),
        "extra": extra,
    }
    err = None
    try:                                 # refuse what JSON cannot hold before writing
        text = canonical_json(manifest, "manifest")
        if rank == 0:
            os.makedirs(path, exist_ok=True)
    except (TypeError, ValueError, OSError) as exc:
        err = f"cannot save to {path!r}: {type(exc).__name__}: {exc}"
    collective_check(coll, err, "the argument check of save()")
    # what killed saves left: every rank removes its own host's (and old ones)
    remove_stale_temporaries(path, _OWN_FILES, STALE_TEMPORARY_AGE)
    try:
        if mine is not None:
            save_checkpoint(os.path.join(path, mine["file"]), dp.optimizer,
                            params=[dp.param_view],
                            extra={"save_id": save_id, "lo": mine["lo"], "hi": mine["hi"]})
    except Exception as exc:             # report on every rank, never hang
        err = f"{type(exc).__name__}: {exc}"
    collective_check(coll, err, "the shard write check of save()")
    if rank == 0:
        try:
            atomic_write(os.path.join(path, MANIFEST), lambda f: f.write(text))
            keep = {sh["file"] for sh in shards}
            for name in os.listdir(path):
                if name.startswith("shard-") and name.endswith(".npz") and name not in keep:
                    os.remove(os.path.join(path, name))
        except Exception as exc:
            err = f"{type(exc).__name__}: {exc}"
    collective_check(coll, err, "the manifest write check of save()")


def load(dp, path):
    """:meth:`DataParallel.load`."""
    coll, opt = dp._coll, dp.optimizer
    err, manifest, digest, pieces = None, None, None, None
    try:
        manifest, digest = _read_manifest(dp, path)
        pieces = _read_pieces(dp, path, manifest)
    except Exception as exc:
        err = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
    collective_check(coll, err, "the file check of load()")
    sd, params = pieces
    # every rank must have read the same checkpoint (a rank given another folder reads
    # another save, perhaps of as many steps) and the same hyperparameters and counters
    # (the files of one save can differ)
    meta = hashlib.blake2b(canonical_json({k: v for k, v in sd.items() if k != "state"},
                                          "state_dict"), digest_size=16).hexdigest()
    read = coll.allgather("the comparison of what each rank read in load()",
                          ((manifest["save_id"], digest), os.fspath(path), meta))
    saves = by_value([s for s, _, _ in read])
    if len(saves) > 1:
        raise ValueError("DataParallel.load(): the ranks read different checkpoints: " +
                         ", ".join(f"rank(s) {ranks} save {sid} (manifest {dg[:12]}) in "
                                   f"{read[ranks[0]][1]!r}"
                                   for (sid, dg), ranks in saves) +
                         " (every rank must load the same checkpoint)")
    metas = [m for _, _, m in read]
    if any(m != metas[0] for m in metas):
        raise ValueError(f"checkpoint {path!r}: the shard files hold different "
                         f"hyperparameters or step counts: rank(s) "
                         f"{[r for r, m in enumerate(metas) if m != metas[0]]} read "
                         f"other ones than rank 0")
    err, before = None, opt.state_dict()
    try:
        opt.load_state_dict(sd)              # checks everything, then applies
    except Exception as exc:
        err = f"checkpoint {path!r}: {exc}"
    try:
        collective_check(coll, err, "the state check of load()")
    except ValueError:
        if err is None:                      # this rank loaded, another refused: undo
            opt.load_state_dict(before)
        raise
    np.copyto(dp.param_view, params)
    if dp.shard_state and dp.world > 1:
        dp._allgather()
    norm = manifest["last_grad_norm"]
    opt.last_grad_norm = float(norm) if isinstance(norm, str) else norm
    return manifest["extra"]


def _read_manifest(dp, path):
    """The manifest in ``path``, checked against ``dp``, and a digest of its bytes."""
    where = os.path.join(path, MANIFEST)
    try:
        with open(where, "rb") as fh:
            raw = fh.read()
        m = json.loads(raw.decode("utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{where}: no such file (not a ch8fast.distributed "
                         f"checkpoint, or its save did not finish)") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where}: unreadable ({exc})") from None
    if not isinstance(m, dict) or m.get("format") != DIST_CHECKPOINT_FORMAT \
            or m.get("format_version") != DIST_CHECKPOINT_VERSION:
        raise ValueError(f"{where}: not a {DIST_CHECKPOINT_FORMAT} version "
                         f"{DIST_CHECKPOINT_VERSION} manifest")
    mine = type(dp.optimizer).__name__
    if m["optimizer"] != mine:
        raise ValueError(f"{where}: holds {m['optimizer']} state; this optimizer is {mine}")
    if m["size"] != dp.flat.size or m["dtype"] != dp.flat.dtype.str:
        raise ValueError(f"{where}: holds {m['size']} parameters of dtype {m['dtype']}, "
                         f"this arena has {dp.flat.size} of {dp.flat.dtype.str}")
    layout = arena_layout(dp.arena)
    if layout is not None and m["layout"] is not None and m["layout"] != layout:
        raise ValueError(f"{where}: the arena's names, shapes or offsets differ from the "
                         f"checkpoint's")
    lo = 0
    for s in m["shards"]:
        if s["lo"] != lo or s["hi"] < s["lo"]:
            raise ValueError(f"{where}: the shards do not tile the buffer")
        lo = s["hi"]
    if lo != dp.flat.size:
        raise ValueError(f"{where}: the shards do not cover the buffer")
    return m, hashlib.blake2b(raw, digest_size=16).hexdigest()


def _copy_blocks(dst, src, a, b, at, fname, name):
    """Copy the per-block entries of elements [a, b) of dst from those of src starting at
    element ``at`` (both slices start on a block; the last may end inside one)."""
    B = storage.BLOCK
    if a % B or at % B:
        raise ValueError(f"{fname}: state {name!r} has one entry per block of {B} "
                         f"elements, but the slices do not start on a block")
    k = -(-(b - a) // B)
    if a // B + k > dst.shape[0] or at // B + k > src.shape[0]:
        raise ValueError(f"{fname}: state {name!r} has {src.shape[0]} entries, too few "
                         f"for its slice")
    dst[a // B:a // B + k] = src[at // B:at // B + k]


def _read_pieces(dp, path, m):
    """(state dict, parameters) of this rank's slice, cut from the overlapping files."""
    lo, hi = (dp.lo, dp.hi) if dp.shard_state else (0, dp.flat.size)
    n = hi - lo
    opt = dp.optimizer
    live = opt.state[0]
    names = list(live)
    # each state array as the optimizer keeps it: one entry per element (float32, or the
    # codes of compressed state), or one per block of storage.BLOCK elements (the scales
    # of 8-bit state, ``name + SCALES``, whose slices start on a block). Told by what the
    # entry is, not by its length: a slice of one element has one scale too.
    blocked = {k for k in names if opt.state_format == "q8" and k.endswith(SCALES)
               and k[:-len(SCALES)] in live}
    for k in names:
        want = (-(-n // storage.BLOCK),) if k in blocked else (n,)
        if live[k].shape != want:
            raise ValueError(f"state {k!r} of this rank's optimizer has shape "
                             f"{live[k].shape}, not {want} (one entry per "
                             f"{'block' if k in blocked else 'element'} of its slice): "
                             f"it cannot be cut from the checkpoint's")
    state = {k: np.empty(live[k].shape, live[k].dtype) for k in names}
    params = np.empty(n, dp.flat.dtype)
    meta = None
    overlap = [s for s in m["shards"] if max(lo, s["lo"]) < min(hi, s["hi"])]
    for s in overlap or m["shards"][:1]:      # an empty slice still checks one file
        a, b = max(lo, s["lo"]), min(hi, s["hi"])
        fname = os.path.join(path, s["file"])
        header, arrays = read_checkpoint(fname)
        ex = header.get("extra") or {}
        if ex.get("save_id") != m["save_id"] or ex.get("lo") != s["lo"] \
                or ex.get("hi") != s["hi"]:
            raise ValueError(f"{fname}: belongs to another save than {MANIFEST} (save id "
                             f"or slice differ): an interrupted save?")
        if header["n_params"] != 1 or not header["has_params"]:
            raise ValueError(f"{fname}: expected one parameter slice with its values")
        sd = header["state_dict"]
        if meta is None:
            meta = sd
        elif sd != meta:
            raise ValueError(f"{fname}: hyperparameters or step counts differ from the "
                             f"other shards'")
        if a >= b:
            continue
        saved_names = sorted(k[len("state.0."):] for k in arrays
                             if k.startswith("state.0."))
        if saved_names != sorted(names):
            raise ValueError(f"{fname}: holds state {saved_names}, the optimizer keeps "
                             f"{sorted(names)}")
        for k in names:
            src = arrays["state.0." + k]
            if src.dtype != state[k].dtype:
                raise ValueError(f"{fname}: state {k!r} is {src.dtype}, the optimizer "
                                 f"keeps {state[k].dtype} (another state_format?)")
            if k in blocked:
                _copy_blocks(state[k], src, a - lo, b - lo, a - s["lo"], fname, k)
            else:
                state[k][a - lo:b - lo] = src[a - s["lo"]:b - s["lo"]]
        src, dst = arrays["param.0"], params
        if storage.is_16bit(params.dtype) and src.dtype == np.uint16:
            dst = params.view(np.uint16)           # bfloat16 is stored as its bits
        if src.dtype != dst.dtype:
            raise ValueError(f"{fname}: the parameters are {src.dtype}, this arena "
                             f"{params.dtype}")
        dst[a - lo:b - lo] = src[a - s["lo"]:b - s["lo"]]
    if meta is None:
        raise ValueError(f"{path}: no shard file to read")
    return dict(meta, state=[state]), params
