"""How parameters and optimizer state are stored: 16-bit parameters, compressed state.

An update is bound by memory traffic at sizes that do not fit in cache, so storing fewer
bytes is the way to be faster. The arithmetic always runs in float32 registers; only what
is stored changes (the kernels, ``src/loops.pxi`` and ``src/storage.h``, decode a block of
256 elements, update it, and encode it back, in one pass).

Parameters (the dtype of the arrays you give the optimizer):

* float32, float64: updated in place, as always;
* float16 and bfloat16 (``ml_dtypes.bfloat16``, an optional dependency), with
  ``param_mode``:

  - ``"master"`` (default): the optimizer keeps a float32 master copy (state entry
    ``"master"``); after each step the 16-bit array holds its rounding to nearest even.
    An edit of the 16-bit array between steps takes effect (where it no longer holds the
    master's rounding, the master takes its value).
  - ``"stochastic"``: no master; each step rounds the float32 result stochastically
    (unbiased; seeded by ``seed``; the same bits for any number of threads and any split
    of a group's arrays).
  - ``"kahan"``: the 16-bit array plus a bfloat16 compensation (state entry
    ``"compensation"``), the rounding error of the last write, so that theta is their sum
    (about 16 significant bits for bfloat16, 19 for float16). An edit of the 16-bit array
    keeps the compensation (at most half a unit in its last place). A theta past the
    largest finite 16-bit value (65504 for float16) leaves that value in the array and
    the rest in the compensation, so theta stays right (with a master copy, the array
    shows inf).

State (``state_format``), for float32 and 16-bit parameters (float64 ones keep float64):

* ``"float32"`` (default);
* ``"bfloat16"``: first moments and velocities rounded to nearest even, accumulators of
  squares stochastically (nearest rounding would stall their decay: with rho = 0.999 a
  0.1 % shrink rounds back to the same value). Stored as its raw bits (uint16);
* ``"q8"``: one byte per element and a float32 scale (the block's largest magnitude) per
  block of 256 elements: signed state as E4M3 codes rounded to nearest even, accumulators
  of squares as unsigned E5M3 codes rounded stochastically and never to 0 (a zero second
  moment would turn Adam's step into m / eps). State entries ``name`` (uint8 codes) and
  ``name + ".absmax"`` (float32 scales).

Bytes per parameter per Adam step (reads + writes, the gradient in the parameter's dtype):

==============================  =======  ==========  =========
parameters                      f32 m,v  bf16 m, v   q8 m, v
==============================  =======  ==========  =========
float32                         28       20          16.06
16-bit, master                  30       22          18.06
16-bit, stochastic              22       14          10.06
16-bit, kahan                   26       18          14.06
==============================  =======  ==========  =========

(master: the master copy read and written, the 16-bit array read, to see edits, and
written.) Resident bytes per parameter: state 8 (float32), 4 (bfloat16), 2.03 (q8);
parameters 2 (stochastic), 4 (kahan), 6 (master).
"""

import sys

import numpy as np

from ._isa import K

__all__ = ["STATE_FORMATS", "PARAM_MODES", "BLOCK", "bfloat16", "is_bfloat16",
           "is_16bit", "state_storage", "decode"]

STATE_FORMATS = ("float32", "bfloat16", "q8")
PARAM_MODES = ("master", "stochastic", "kahan")
BLOCK = K.BLOCK                      # elements per block of 8-bit codes (one scale each)


def bfloat16():
    """``numpy.dtype`` of ``ml_dtypes.bfloat16``; ImportError with what to install if
    ml_dtypes is absent."""
    try:
        import ml_dtypes
    except ImportError:
        raise ImportError("bfloat16 arrays need the ml_dtypes package (pip install "
                          "ml_dtypes); float16 needs nothing") from None
    return np.dtype(ml_dtypes.bfloat16)


def is_bfloat16(dtype):
    """Whether ``dtype`` is ml_dtypes' bfloat16 (without importing ml_dtypes: an array of
    it exists only once ml_dtypes is imported)."""
    m = sys.modules.get("ml_dtypes")
    return m is not None and np.dtype(dtype) == np.dtype(m.bfloat16)


def is_16bit(dtype):
    """float16 or bfloat16."""
    return np.dtype(dtype) == np.float16 or is_bfloat16(dtype)


def storage_name(dtype):
    """The kernels' name of a parameter dtype: "float32", "float64", "float16" or
    "bfloat16"."""
    return "bfloat16" if is_bfloat16(dtype) else np.dtype(dtype).name


def state_storage(state_format, kind):
    """How a state array of ``kind`` ("signed": moments and velocities; "square":
    accumulators of squares) is stored under ``state_format``: the kernels' storage name."""
    if state_format == "bfloat16":
        return "bfloat16" if kind == "signed" else "bfloat16_sr"
    if state_format == "q8":
        return "q8_signed" if kind == "signed" else "q8_unsigned"
    return "float32"


def new_state(storage, shape, fill, compute_dtype):
    """The arrays of one state entry stored as ``storage``, every element ``fill``:
    ``(data, scales)``, ``scales`` None but for 8-bit codes."""
    if storage == "float32":
        return np.full(shape, fill, compute_dtype), None
    values = np.full(int(np.prod(shape, dtype=np.int64)), fill, np.float32)
    data, scales = K.encode_block_state(storage, values)
    return data.reshape(shape), scales


def decode(storage, data, scales=None):
    """float32 values of stored state (a copy)."""
    if storage == "float32":
        return np.array(data, np.float32)
    return K.decode_block_state(storage, data, scales).reshape(np.shape(data))


def to_float32(a):
    """A float32 copy of a parameter array of any supported dtype (exact)."""
    if is_bfloat16(a.dtype):
        return K.decode_block_state("bfloat16", a.view(np.uint16)).reshape(a.shape)
    return np.array(a, np.float32)


def sync_master(a, master):
    """Where the 16-bit array ``a`` no longer holds the rounding of its float32 ``master``
    copy (the user edited it), the master copy takes its value, as the next step would
    (the kernels compare the bits the same way)."""
    bits = K.round16(storage_name(a.dtype), master.reshape(-1), "nearest")
    edited = bits != a.view(np.uint16).reshape(-1)
    if edited.any():
        master.reshape(-1)[edited] = to_float32(a).reshape(-1)[edited]
    return master


def round_to(a, values, stochastic=False, key=0, index=0, saturate=False):
    """Write float32 ``values`` into the 16-bit (or float32/64) array ``a`` in place,
    rounded to nearest even (or stochastically, with the random words of ``key`` from
    element ``index`` on; or, with ``saturate``, to nearest even with finite values past
    the largest finite one kept at it, as the 16-bit part of a "kahan" parameter)."""
    if not is_16bit(a.dtype):
        np.copyto(a, values, casting="same_kind")
        return
    how = "stochastic" if stochastic else "saturate" if saturate else "nearest"
    bits = K.round16(storage_name(a.dtype), np.ascontiguousarray(values, np.float32)
                     .reshape(-1), how, key, index)
    a.view(np.uint16).reshape(-1)[...] = bits
