r"""Row-sparse gradients: embedding tables whose minibatch touches a few rows.

The gradient of an embedding table ``E`` (``n_rows`` by ``d``) for a minibatch is zero
except on the rows the batch looked up. :class:`SparseRows` carries only those rows, as
torch's sparse COO gradients and TensorFlow's ``IndexedSlices`` do; pass it to an
optimizer's ``step`` in place of a dense gradient for a 2-D parameter (other parameters in
the same step keep dense gradients). Duplicate indices are summed, in an order that does
not depend on the order they come in (each element's contributions are added sorted, in
double precision, and rounded once), so the result has the same bits for any order of
duplicates and any number of threads.

Only the touched rows of the parameter and of its state are read and written: the update
costs the bytes of those rows, not of the table. This differs from the book's rules, which
update every row at every step (a zero gradient still decays the state and, with
momentum, still moves the parameter):

=============  =====================================  =====================================
rule           dense update of an untouched row       lazy (``sparse="lazy"``, default)
=============  =====================================  =====================================
SGD            none (L2 decay: theta shrinks)         none (no L2 decay)
momentum       v <- alpha v; theta <- theta + v       nothing
AdaGrad        none (L2 decay: theta shrinks)         none (no L2 decay): equal to dense
RMSProp        r <- rho r (momentum: as above)        nothing
Adam, AdamW    s, r decay; theta moves by s_hat /     nothing
               (sqrt(r_hat) + delta); AdamW decay
AdaDelta       both averages decay by rho             nothing
=============  =====================================  =====================================

``sparse="catch_up"`` keeps, per row, the step of its last update (state ``"last_step"``)
and, when a row is next touched after ``dt`` skipped steps, first applies in closed form
what those steps would have done with a zero gradient: the state's decays (rho^dt,
beta^dt, alpha^dt), momentum's drift of theta (v alpha (1 - alpha^dt) / (1 - alpha), then
v <- alpha^dt v) and AdamW's decay (1 - lr lambda)^dt. This is exactly the dense update
for SGD, momentum, RMSProp (with momentum too), AdaGrad and AdaDelta without L2 weight
decay at constant hyperparameters; for Adam the missed movement of theta (each step's
s_hat / (sqrt(r_hat) + delta)) has no closed form and is not applied. The shifted Nesterov
form has no catch-up (refused).

Row-wise AdaGrad (``AdaGrad(..., rowwise=True)``) keeps one accumulator per row of each
parameter of two or more dimensions (the mean of the squared row gradient), for dense and
sparse gradients alike: state bytes divided by the row length.
"""

import numpy as np

from ._isa import K

__all__ = ["SparseRows"]


class SparseRows:
    """A row-sparse gradient of a 2-D parameter.

    Args:
        indices: a 1-D array of integers (any integer dtype, not bool), the rows.
        values: an array of shape ``(len(indices), row_length)``, the gradient's rows, of
            the parameter's dtype (float32 too for a 16-bit parameter); any layout (it is
            only read).

    Checked against its parameter at the step (rows in range, shapes, dtype); duplicate
    indices are summed there.
    """

    __slots__ = ("indices", "values")

    def __init__(self, indices, values):
        if not isinstance(indices, np.ndarray) or not isinstance(values, np.ndarray):
            raise TypeError(f"SparseRows(indices, values): numpy arrays, got "
                            f"{type(indices).__name__} and {type(values).__name__}")
        if indices.dtype.kind not in "iu":
            raise TypeError(f"SparseRows: indices must be integers, got dtype "
                            f"{indices.dtype}")
        if indices.ndim != 1:
            raise ValueError(f"SparseRows: indices must be 1-D, got shape {indices.shape}")
        if values.ndim != 2 or values.shape[0] != indices.shape[0]:
            raise ValueError(f"SparseRows: values must have shape (len(indices), "
                             f"row_length) = ({indices.shape[0]}, ...), got {values.shape}")
        self.indices = indices
        self.values = values

    def __len__(self):
        return self.indices.shape[0]

    def to_dense(self, n_rows):
        """The dense gradient, duplicates summed as the optimizers sum them."""
        rows, summed = sum_duplicates(self.indices, self.values, n_rows)
        out = np.zeros((n_rows, self.values.shape[1]), summed.dtype)
        out[rows] = summed
        return out

    def __repr__(self):
        return (f"SparseRows({len(self)} rows of {self.values.shape[1]} "
                f"{self.values.dtype})")


def sum_duplicates(indices, values, n_rows):
    """``(rows, summed)``: the distinct indices (in order of first appearance) and, for
    each, the sum of its rows, as the optimizers compute it: each element's contributions
    added in increasing order of value, in float64, rounded once (to float32 for 16-bit
    values), so the same bits for any order of the duplicates. Indices must be in
    ``[0, n_rows)``."""
    rows, summed = K.sum_duplicate_rows(np.asarray(indices), np.ascontiguousarray(values),
                                        int(n_rows))
    return rows, summed


K.register_sparse_type(SparseRows)
