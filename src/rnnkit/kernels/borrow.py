"""``borrow``: an array without its reference count, for the hot loops.

numba counts references to every array through its runtime: each view a loop takes (``h[r]``,
``out[t, r]``, an inlined function's argument) increments the owner's count on creation and
decrements it when dropped, both atomic updates through a call. Its pruning pass removes the
pairs it can prove redundant, but not across the loops of an inlined cell: in the batch-1 time
loops they took about a third of the time (measured with perf: the lock-prefixed instructions
of NRT_incref / NRT_decref). A borrowed array is the same array (data, shape, strides) with no
owner: views of it carry none either, so the runtime calls find nothing to count and return.

Only for arrays that the caller keeps alive for the whole call and that never leave it (never
returned or stored): the kernels' own arguments, inside the kernel.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


@intrinsic
def borrow(typingctx, a):
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        src = context.make_array(signature.args[0])(context, builder, args[0])
        dst = context.make_array(signature.return_type)(context, builder)
        for field in ("nitems", "itemsize", "data", "shape", "strides"):
            setattr(dst, field, getattr(src, field))
        dst.meminfo = cgutils.get_null_value(dst.meminfo.type)
        dst.parent = cgutils.get_null_value(dst.parent.type)
        return dst._getvalue()

    return a(a), codegen
