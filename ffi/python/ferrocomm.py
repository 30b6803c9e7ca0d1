"""ferrocomm from Python: a small ctypes module over libferrocomm.so, with numpy arrays.

    import numpy as np, ferrocomm
    comm = ferrocomm.Communicator.init()          # under ferrorun / torchrun / srun
    x = np.full(4, comm.rank, dtype=np.float32)
    comm.send(x, (comm.rank + 1) % comm.size, tag=0)

Buffers are numpy arrays, C-contiguous, of uint8..int64, float16, float32 or float64 (and
bfloat16 when the ml_dtypes package provides it, or uint16 arrays with dtype="bf16").
Errors raise ferrocomm.Error with the library's code and full message. Handles are
released when their objects are garbage collected, by close(), or by finalize().

The shared library is found through FERROCOMM_LIB (a path), then next to this file's
install location (PREFIX/lib), then the cargo build directories of a source checkout,
then the system's search path.
"""

import contextlib
import ctypes
import ctypes.util
import os
from collections import namedtuple

import numpy as np

__all__ = [
    "ANY_SOURCE",
    "ANY_TAG",
    "AVG",
    "MAX",
    "MIN",
    "PROD",
    "SUM",
    "Communicator",
    "Error",
    "Request",
    "Status",
    "finalize",
    "sampler_indices",
    "version",
    "waitall",
]

ANY_SOURCE = -1
ANY_TAG = -1

# ferrocomm_result codes (ferrocomm.h).
OK = 0
ERR_INVALID_ARGUMENT = 1
ERR_INVALID_HANDLE = 2
ERR_BUSY = 3
ERR_CONFIG = 4
ERR_TIMEOUT = 5
ERR_PEER_LOST = 6
ERR_PEER_MISBEHAVED = 7
ERR_JOB_MISMATCH = 8
ERR_COLLECTIVE_MISMATCH = 9
ERR_IO = 10
ERR_ABORTED = 11
ERR_PANIC = 12
ERR_INTERNAL = 13

# ferrocomm_dtype codes (ferrocomm.h): 0x100 + n, disjoint from the operations' codes.
U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64 = range(0x100, 0x10C)
_DTYPES = {
    np.dtype(np.uint8): U8,
    np.dtype(np.int8): I8,
    np.dtype(np.uint16): U16,
    np.dtype(np.int16): I16,
    np.dtype(np.uint32): U32,
    np.dtype(np.int32): I32,
    np.dtype(np.uint64): U64,
    np.dtype(np.int64): I64,
    np.dtype(np.float16): F16,
    np.dtype(np.float32): F32,
    np.dtype(np.float64): F64,
}

# ferrocomm_op codes (ferrocomm.h): 0x200 + n; methods also take the names "sum", "prod", ...
SUM, PROD, MAX, MIN, AVG = range(0x200, 0x205)
_OPS = {"sum": SUM, "prod": PROD, "max": MAX, "min": MIN, "avg": AVG}

# FERROCOMM_IN_PLACE: the address 1.
_IN_PLACE = 1
# FERROCOMM_UNDEFINED: the color of a rank that joins no communicator in split().
UNDEFINED = -1

SAMPLER_NO_SHUFFLE = 1
SAMPLER_DROP_LAST = 2


class Error(Exception):
    """A failed ferrocomm call: `code` (a ferrocomm_result) and the library's message."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.message = message


Status = namedtuple("Status", ["source", "tag", "bytes", "error"])


class _Status(ctypes.Structure):
    _fields_ = [
        ("source", ctypes.c_size_t),
        ("bytes", ctypes.c_size_t),
        ("tag", ctypes.c_uint32),
        ("error", ctypes.c_uint32),
    ]

    def to_tuple(self):
        return Status(self.source, self.tag, self.bytes, self.error)


def _candidates():
    env = os.environ.get("FERROCOMM_LIB")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    # Installed: PREFIX/share/ferrocomm/python/ferrocomm.py -> PREFIX/lib.
    yield os.path.join(here, "..", "..", "..", "lib", "libferrocomm.so")
    # A source checkout: ffi/python/ferrocomm.py -> target/{release,debug}.
    for profile in ("release", "debug"):
        yield os.path.join(here, "..", "..", "target", profile, "libferrocomm.so")
    found = ctypes.util.find_library("ferrocomm")
    if found:
        yield found


def _load():
    tried = []
    for path in _candidates():
        if os.path.sep in path and not os.path.exists(path):
            tried.append(path)
            continue
        try:
            return ctypes.CDLL(path)
        except OSError as e:
            tried.append(f"{path} ({e})")
    raise ImportError(
        "ferrocomm: libferrocomm.so not found; set FERROCOMM_LIB to its path or install it "
        "with scripts/install. Tried: " + ", ".join(tried)
    )


_lib = _load()

_p = ctypes.c_void_p
_sz = ctypes.c_size_t
_u32, _i64, _u64 = ctypes.c_uint32, ctypes.c_int64, ctypes.c_uint64
_PSZ = ctypes.POINTER(_sz)
_PST = ctypes.POINTER(_Status)
_PP = ctypes.POINTER(_p)
_SIGNATURES = {
    "ferrocomm_version": ([], ctypes.c_char_p),
    "ferrocomm_last_error": ([], ctypes.c_char_p),
    "ferrocomm_strerror": ([_u32], ctypes.c_char_p),
    "ferrocomm_dtype_size": ([_u32, _PSZ], _u32),
    "ferrocomm_init_url": ([ctypes.c_char_p, _i64, _i64, _PP], _u32),
    "ferrocomm_comm_free": ([_p], _u32),
    "ferrocomm_finalize": ([], _u32),
    "ferrocomm_comm_rank": ([_p, _PSZ], _u32),
    "ferrocomm_comm_size": ([_p, _PSZ], _u32),
    "ferrocomm_comm_local_rank": ([_p, _PSZ], _u32),
    "ferrocomm_comm_local_size": ([_p, _PSZ], _u32),
    "ferrocomm_comm_node_index": ([_p, _PSZ], _u32),
    "ferrocomm_comm_dup": ([_p, _PP], _u32),
    "ferrocomm_comm_abort": ([_p, ctypes.c_char_p], _u32),
    "ferrocomm_barrier": ([_p], _u32),
    "ferrocomm_send": ([_p, _p, _sz, _u32, _sz, _u32], _u32),
    "ferrocomm_recv": ([_p, _p, _sz, _u32, _i64, _i64, _PST], _u32),
    "ferrocomm_sendrecv": ([_p, _p, _sz, _u32, _sz, _u32, _p, _sz, _i64, _i64, _PST], _u32),
    "ferrocomm_isend": ([_p, _p, _sz, _u32, _sz, _u32, _PP], _u32),
    "ferrocomm_irecv": ([_p, _p, _sz, _u32, _i64, _i64, _PP], _u32),
    "ferrocomm_wait": ([_p, _PST], _u32),
    "ferrocomm_test": ([_p, ctypes.POINTER(ctypes.c_int), _PST], _u32),
    "ferrocomm_waitall": ([_sz, _PP, _PST], _u32),
    "ferrocomm_request_free": ([_p], _u32),
    "ferrocomm_allreduce": ([_p, _p, _p, _sz, _u32, _u32], _u32),
    "ferrocomm_iallreduce": ([_p, _p, _p, _sz, _u32, _u32, _PP], _u32),
    "ferrocomm_broadcast": ([_p, _p, _sz, _u32, _sz], _u32),
    "ferrocomm_ibroadcast": ([_p, _p, _sz, _u32, _sz, _PP], _u32),
    "ferrocomm_reduce": ([_p, _p, _p, _sz, _u32, _u32, _sz], _u32),
    "ferrocomm_allgather": ([_p, _p, _p, _sz, _u32], _u32),
    "ferrocomm_iallgather": ([_p, _p, _p, _sz, _u32, _PP], _u32),
    "ferrocomm_reduce_scatter": ([_p, _p, _p, _sz, _u32, _u32], _u32),
    "ferrocomm_gather": ([_p, _p, _p, _sz, _u32, _sz], _u32),
    "ferrocomm_scatter": ([_p, _p, _p, _sz, _u32, _sz], _u32),
    "ferrocomm_alltoall": ([_p, _p, _p, _sz, _u32], _u32),
    "ferrocomm_ibarrier": ([_p, _PP], _u32),
    "ferrocomm_allreduce_many": ([_p, _PP, _PSZ, _sz, _u32, _u32, _sz], _u32),
    "ferrocomm_comm_split": ([_p, _i64, _i64, _PP], _u32),
    "ferrocomm_comm_create_group": ([_p, _PSZ, _sz, _PP], _u32),
    "ferrocomm_reducer_new": (
        [_p, _sz, ctypes.POINTER(ctypes.c_char_p), ctypes.POINTER(_u32), _PSZ, _PP, _PSZ,
         ctypes.c_double, ctypes.c_double, ctypes.c_int, _PP],
        _u32,
    ),
    "ferrocomm_reducer_mark_ready": ([_p, _sz, _p, _sz], _u32),
    "ferrocomm_reducer_finish": ([_p], _u32),
    "ferrocomm_reducer_grad": ([_p, _sz, _p, _sz], _u32),
    "ferrocomm_reducer_set_sync": ([_p, ctypes.c_int], _u32),
    "ferrocomm_reducer_index": ([_p, ctypes.c_char_p, _PSZ], _u32),
    "ferrocomm_reducer_free": ([_p], _u32),
    "ferrocomm_broadcast_parameters": ([_p, _PP, _PSZ, ctypes.POINTER(_u32), _sz], _u32),
    "ferrocomm_sampler_indices": (
        [_u64, _u64, _u64, _u64, _u64, _u32, ctypes.POINTER(_u64), _sz, _PSZ],
        _u32,
    ),
}
for _name, (_args, _res) in _SIGNATURES.items():
    _f = getattr(_lib, _name)
    _f.argtypes = _args
    _f.restype = _res


def last_error():
    """The message of the most recent failed call on this thread."""
    return _lib.ferrocomm_last_error().decode("utf-8", "replace")


def strerror(code):
    """The short description of a result code."""
    return _lib.ferrocomm_strerror(code).decode()


def _check(code):
    if code != OK:
        raise Error(code, f"{strerror(code)}: {last_error()}")


def version():
    """The library's version string."""
    return _lib.ferrocomm_version().decode()


def _dtype_code(arr, dtype):
    if dtype is not None:
        if dtype in ("bf16", "bfloat16", BF16):
            if arr.dtype.itemsize != 2:
                raise TypeError("bf16 buffers hold 2-byte elements (use a uint16 array)")
            return BF16
        raise ValueError(f"unknown dtype override {dtype!r} (only 'bf16')")
    if arr.dtype.name == "bfloat16":  # ml_dtypes
        return BF16
    code = _DTYPES.get(arr.dtype)
    if code is None:
        raise TypeError(
            f"ferrocomm cannot send {arr.dtype} arrays (uint8..int64, float16, float32, "
            "float64, bfloat16)"
        )
    return code


def _buffer(arr, dtype, writable):
    """(pointer, count, dtype code) of a numpy array used as a buffer."""
    if not isinstance(arr, np.ndarray):
        raise TypeError(f"buffers are numpy arrays, not {type(arr).__name__}")
    if not arr.flags.c_contiguous:
        raise ValueError("buffers must be C-contiguous (np.ascontiguousarray)")
    if not arr.dtype.isnative:
        raise ValueError("buffers must be in native byte order")
    if not arr.flags.aligned:
        raise ValueError("buffers must be aligned for their element type (np.ascontiguousarray)")
    if writable and not arr.flags.writeable:
        raise ValueError("receive buffers must be writable")
    return arr.ctypes.data, arr.size, _dtype_code(arr, dtype)


def _length(buf, want, what):
    """Refuses a buffer (from _buffer) that does not hold exactly `want` elements: the
    library trusts the lengths it is given and would write past the end of a shorter one."""
    if buf[1] != want:
        raise ValueError(f"{what} has {buf[1]} elements but must have {want}")


def _op(op):
    if isinstance(op, str):
        code = _OPS.get(op.lower())
        if code is None:
            raise ValueError(f"unknown reduction {op!r} (sum, prod, max, min, avg)")
        return code
    return int(op)


def _same(a, b, what):
    if a[2] != b[2]:
        raise TypeError(f"{what}: both arrays must have one element type")


class Request:
    """A non-blocking send, receive or collective. Keeps its arrays alive until it has
    finished; a request that is garbage collected unfinished is released (a receive nothing
    matched is withdrawn, a transfer in flight is waited for, a collective finishes without
    writing its output array)."""

    def __init__(self, handle, array):
        self._h = handle
        self._array = array

    def wait(self):
        """Waits for completion and returns its Status."""
        h, self._h = self._take(), None
        st = _Status()
        try:
            _check(_lib.ferrocomm_wait(h, ctypes.byref(st)))
        finally:
            self._array = None
        return st.to_tuple()

    def test(self):
        """The Status if complete (the request is then finished), else None."""
        done = ctypes.c_int(0)
        st = _Status()
        code = _lib.ferrocomm_test(self._h, ctypes.byref(done), ctypes.byref(st))
        if done.value:
            self._h, self._array = None, None
        _check(code)
        return st.to_tuple() if done.value else None

    def free(self):
        """Releases the request without its result (see the class doc)."""
        if self._h is not None:
            h, self._h = self._h, None
            try:
                _check(_lib.ferrocomm_request_free(h))
            finally:
                self._array = None

    @property
    def done(self):
        return self._h is None

    def _take(self):
        if self._h is None:
            raise Error(ERR_INVALID_HANDLE, "this request has already finished")
        return self._h

    def __del__(self):
        if getattr(self, "_h", None) is not None and _lib is not None:
            _lib.ferrocomm_request_free(self._h)


def waitall(requests):
    """Waits for every request; returns their Statuses. Raises the first failure after all
    have finished."""
    requests = list(requests)
    handles = (_p * len(requests))(*[r._take() for r in requests])
    sts = (_Status * len(requests))()
    code = _lib.ferrocomm_waitall(len(requests), handles, sts)
    if code != ERR_INVALID_HANDLE:
        for r in requests:
            r._h, r._array = None, None
    _check(code)
    return [s.to_tuple() for s in sts]


class Communicator:
    """A communicator (ferrocomm_comm_t). Use from one thread at a time; dup() gives
    another thread its own."""

    def __init__(self, handle):
        self._h = handle

    @classmethod
    def init(cls, url=None, world_size=-1, rank=-1):
        """Joins the job: from the environment (ferrorun, torchrun, srun, mpirun) by
        default, or through an init method URL (tcp://HOST:PORT, env://, file:///path)."""
        h = _p()
        u = url.encode() if url is not None else None
        _check(_lib.ferrocomm_init_url(u, world_size, rank, ctypes.byref(h)))
        return cls(h.value)

    def _query(self, f):
        v = _sz(0)
        _check(f(self._h, ctypes.byref(v)))
        return v.value

    @property
    def rank(self):
        return self._query(_lib.ferrocomm_comm_rank)

    @property
    def size(self):
        return self._query(_lib.ferrocomm_comm_size)

    @property
    def local_rank(self):
        return self._query(_lib.ferrocomm_comm_local_rank)

    @property
    def local_size(self):
        return self._query(_lib.ferrocomm_comm_local_size)

    @property
    def node_index(self):
        return self._query(_lib.ferrocomm_comm_node_index)

    def dup(self):
        """A communicator of the same ranks whose messages never mix with this one's
        (collective: every rank calls it)."""
        h = _p()
        _check(_lib.ferrocomm_comm_dup(self._h, ctypes.byref(h)))
        return Communicator(h.value)

    def abort(self, reason="aborted from Python"):
        """Fails every operation of this world, now and later, in every thread."""
        _check(_lib.ferrocomm_comm_abort(self._h, reason.encode()))

    def barrier(self):
        _check(_lib.ferrocomm_barrier(self._h))

    def send(self, array, dst, tag=0, dtype=None):
        """Sends `array` to rank `dst`; returns when the array may be reused."""
        p, n, d = _buffer(array, dtype, False)
        _check(_lib.ferrocomm_send(self._h, p, n, d, dst, tag))

    def recv(self, array, src=ANY_SOURCE, tag=ANY_TAG, dtype=None):
        """Receives into `array` (at least as large as the message); returns a Status."""
        p, n, d = _buffer(array, dtype, True)
        st = _Status()
        _check(_lib.ferrocomm_recv(self._h, p, n, d, src, tag, ctypes.byref(st)))
        return st.to_tuple()

    def sendrecv(self, send, dst, recv, src, sendtag=0, recvtag=ANY_TAG, dtype=None):
        """Sends `send` to `dst` while receiving into `recv` from `src`."""
        sp, sn, sd = _buffer(send, dtype, False)
        rp, rn, rd = _buffer(recv, dtype, True)
        if sd != rd:
            raise TypeError("sendrecv needs both arrays of one element type")
        st = _Status()
        _check(
            _lib.ferrocomm_sendrecv(
                self._h, sp, sn, sd, dst, sendtag, rp, rn, src, recvtag, ctypes.byref(st)
            )
        )
        return st.to_tuple()

    def isend(self, array, dst, tag=0, dtype=None):
        """Starts sending `array`; do not modify it until the Request has finished."""
        p, n, d = _buffer(array, dtype, False)
        h = _p()
        _check(_lib.ferrocomm_isend(self._h, p, n, d, dst, tag, ctypes.byref(h)))
        return Request(h.value, array)

    def irecv(self, array, src=ANY_SOURCE, tag=ANY_TAG, dtype=None):
        """Starts receiving into `array`; read it after the Request has finished."""
        p, n, d = _buffer(array, dtype, True)
        h = _p()
        _check(_lib.ferrocomm_irecv(self._h, p, n, d, src, tag, ctypes.byref(h)))
        return Request(h.value, array)

    # ---- collectives: every rank calls the same ones in the same order ----

    def all_reduce(self, array, op="sum", out=None, dtype=None):
        """Reduces `array` over every rank with `op` ("sum", "prod", "max", "min", "avg");
        in place unless `out` (same shape and type) is given. Returns the result array."""
        s = _buffer(array, dtype, out is None)
        if out is None:
            _check(_lib.ferrocomm_allreduce(self._h, _IN_PLACE, s[0], s[1], s[2], _op(op)))
            return array
        r = _buffer(out, dtype, True)
        _same(s, r, "all_reduce")
        if r[1] != s[1]:
            raise ValueError("all_reduce: out must be as long as array")
        _check(_lib.ferrocomm_allreduce(self._h, s[0], r[0], s[1], s[2], _op(op)))
        return out

    def iall_reduce(self, array, op="sum", out=None, dtype=None):
        """Starts all_reduce; the result is in `out` (or `array`, in place) once the
        returned Request has finished. Do not touch that array until then."""
        s = _buffer(array, dtype, out is None)
        h = _p()
        if out is None:
            _check(
                _lib.ferrocomm_iallreduce(
                    self._h, _IN_PLACE, s[0], s[1], s[2], _op(op), ctypes.byref(h)
                )
            )
            return Request(h.value, array)
        r = _buffer(out, dtype, True)
        _same(s, r, "iall_reduce")
        if r[1] != s[1]:
            raise ValueError("iall_reduce: out must be as long as array")
        _check(
            _lib.ferrocomm_iallreduce(self._h, s[0], r[0], s[1], s[2], _op(op), ctypes.byref(h))
        )
        return Request(h.value, (array, out))

    def broadcast(self, array, root=0, dtype=None):
        """Copies the root's `array` into every rank's `array`."""
        p, n, d = _buffer(array, dtype, True)
        _check(_lib.ferrocomm_broadcast(self._h, p, n, d, root))
        return array

    def ibroadcast(self, array, root=0, dtype=None):
        """Starts broadcast; read `array` after the Request has finished."""
        p, n, d = _buffer(array, dtype, True)
        h = _p()
        _check(_lib.ferrocomm_ibroadcast(self._h, p, n, d, root, ctypes.byref(h)))
        return Request(h.value, array)

    def reduce(self, array, op="sum", root=0, out=None, dtype=None):
        """Reduces every rank's `array` into the root's `out` (in place in `array` when
        `out` is None). Returns the result at the root, None elsewhere."""
        s = _buffer(array, dtype, out is None)
        if out is None:
            _check(_lib.ferrocomm_reduce(self._h, _IN_PLACE, s[0], s[1], s[2], _op(op), root))
            return array if self.rank == root else None
        r = _buffer(out, dtype, True)
        _same(s, r, "reduce")
        _length(r, s[1], "reduce: out")
        _check(_lib.ferrocomm_reduce(self._h, s[0], r[0], s[1], s[2], _op(op), root))
        return out if self.rank == root else None

    def all_gather(self, array, out=None, dtype=None):
        """Gathers every rank's `array` into `out` (size * len(array) elements, allocated
        when None) in rank order; returns `out`."""
        s = _buffer(array, dtype, False)
        if out is None:
            out = np.empty(self.size * array.size, dtype=array.dtype)
        r = _buffer(out, dtype, True)
        _same(s, r, "all_gather")
        _length(r, self.size * s[1], "all_gather: out (size * len(array))")
        _check(_lib.ferrocomm_allgather(self._h, s[0], r[0], s[1], s[2]))
        return out

    def iall_gather(self, array, out, dtype=None):
        """Starts all_gather into `out`; read it after the Request has finished."""
        s = _buffer(array, dtype, False)
        r = _buffer(out, dtype, True)
        _same(s, r, "iall_gather")
        _length(r, self.size * s[1], "iall_gather: out (size * len(array))")
        h = _p()
        _check(_lib.ferrocomm_iallgather(self._h, s[0], r[0], s[1], s[2], ctypes.byref(h)))
        return Request(h.value, (array, out))

    def reduce_scatter(self, array, op="sum", out=None, dtype=None):
        """Reduces every rank's `array` (size equal blocks) and returns block `rank` of the
        result (in `out` when given)."""
        s = _buffer(array, dtype, False)
        if out is None:
            out = np.empty(array.size // max(self.size, 1), dtype=array.dtype)
        r = _buffer(out, dtype, True)
        _same(s, r, "reduce_scatter")
        if r[1] * self.size != s[1]:
            raise ValueError("reduce_scatter: array must hold size blocks of out's length")
        _check(_lib.ferrocomm_reduce_scatter(self._h, s[0], r[0], r[1], s[2], _op(op)))
        return out

    def gather(self, array, root=0, out=None, dtype=None):
        """Gathers every rank's `array` into the root's `out` (allocated when None);
        returns it at the root, None elsewhere."""
        s = _buffer(array, dtype, False)
        if self.rank == root:
            if out is None:
                out = np.empty(self.size * array.size, dtype=array.dtype)
            r = _buffer(out, dtype, True)
            _same(s, r, "gather")
            _length(r, self.size * s[1], "gather: out (size * len(array))")
            rp = r[0]
        else:
            rp = None
        _check(_lib.ferrocomm_gather(self._h, s[0], rp, s[1], s[2], root))
        return out if self.rank == root else None

    def scatter(self, array, out, root=0, dtype=None):
        """Sends block i of the root's `array` (size blocks of len(out); ignored elsewhere,
        may be None) to rank i's `out`; returns `out`."""
        r = _buffer(out, dtype, True)
        sp = None
        if self.rank == root:
            s = _buffer(array, dtype, False)
            _same(s, r, "scatter")
            _length(s, self.size * r[1], "scatter: array (size * len(out))")
            sp = s[0]
        _check(_lib.ferrocomm_scatter(self._h, sp, r[0], r[1], r[2], root))
        return out

    def all_to_all(self, array, out=None, dtype=None):
        """Sends block j of `array` (size equal blocks) to rank j, which stores it as block
        `rank` of `out` (allocated when None); returns `out`."""
        s = _buffer(array, dtype, False)
        if out is None:
            out = np.empty_like(array)
        r = _buffer(out, dtype, True)
        _same(s, r, "all_to_all")
        if r[1] != s[1] or s[1] % self.size:
            raise ValueError("all_to_all: array and out must hold size equal blocks")
        _check(_lib.ferrocomm_alltoall(self._h, s[0], r[0], s[1] // self.size, s[2]))
        return out

    def ibarrier(self):
        """Starts a barrier; the Request finishes when every rank has started it."""
        h = _p()
        _check(_lib.ferrocomm_ibarrier(self._h, ctypes.byref(h)))
        return Request(h.value, None)

    def all_reduce_many(self, arrays, op="sum", bucket_bytes=0):
        """All-reduces many arrays of one element type in place, packed into buckets of at
        most `bucket_bytes` (0: 25 MiB), as data-parallel training reduces gradients."""
        arrays = list(arrays)
        bufs = [_buffer(a, None, True) for a in arrays]
        if len({b[2] for b in bufs}) > 1:
            raise TypeError("all_reduce_many: all arrays must have one element type")
        d = bufs[0][2] if bufs else F32
        ptrs = (_p * len(bufs))(*[b[0] for b in bufs])
        counts = (_sz * len(bufs))(*[b[1] for b in bufs])
        _check(
            _lib.ferrocomm_allreduce_many(
                self._h, ptrs, counts, len(bufs), d, _op(op), bucket_bytes
            )
        )
        return arrays

    def broadcast_parameters(self, arrays):
        """Overwrites each array (float32, float16 or bfloat16) with rank 0's values, so that
        replicas start equal (see ferrocomm_broadcast_parameters)."""
        arrays = list(arrays)
        bufs = [_buffer(a, None, True) for a in arrays]
        n = len(bufs)
        ptrs = (_p * n)(*[b[0] for b in bufs])
        counts = (_sz * n)(*[b[1] for b in bufs])
        dtypes = (_u32 * n)(*[b[2] for b in bufs])
        _check(_lib.ferrocomm_broadcast_parameters(self._h, ptrs, counts, dtypes, n))
        return arrays

    # ---- sub-communicators ----

    def split(self, color, key=0):
        """Splits by color (MPI_Comm_split): a Communicator of the ranks with the same
        color, ordered by key; None for color None. Every rank calls it."""
        h = _p()
        c = UNDEFINED if color is None else color
        _check(_lib.ferrocomm_comm_split(self._h, c, key, ctypes.byref(h)))
        return Communicator(h.value) if h.value else None

    def create_group(self, ranks):
        """A Communicator of `ranks` (numbered in that order); only they call it."""
        arr = (_sz * len(ranks))(*ranks)
        h = _p()
        _check(_lib.ferrocomm_comm_create_group(self._h, arr, len(ranks), ctypes.byref(h)))
        return Communicator(h.value)

    def close(self):
        """Releases the communicator (also done when it is garbage collected)."""
        if self._h is not None:
            h, self._h = self._h, None
            _check(_lib.ferrocomm_comm_free(h))

    @property
    def handle(self):
        """The C handle, as an integer."""
        return self._h

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None and _lib is not None:
            _lib.ferrocomm_comm_free(self._h)


class Reducer:
    """The gradient reducer (ferrocomm_reducer_new): gradients handed over during backward
    are all-reduced in buckets in the background and averaged over the ranks.

    `params` is a list of (name, array) pairs in model order (the arrays give shape and
    element type: float32, float16 or bfloat16). A collective: every rank passes the same
    list; lists that differ raise Error on every rank naming the first difference."""

    def __init__(self, comm, params, bucket_cap_mb=0.0, first_bucket_mb=0.0,
                 find_unused=False):
        params = list(params)
        n = len(params)
        self._shapes = [tuple(a.shape) for _, a in params]
        self._dtypes = [a.dtype for _, a in params]
        names = (ctypes.c_char_p * n)(*[name.encode() for name, _ in params])
        codes = (_u32 * n)(*[_dtype_code(a, None) for _, a in params])
        numels = (_sz * n)(*[a.size for _, a in params])
        dims = [(_sz * max(a.ndim, 1))(*a.shape) for _, a in params]
        shapes = (_p * n)(*[ctypes.addressof(d) for d in dims])
        ndims = (_sz * n)(*[a.ndim for _, a in params])
        h = _p()
        _check(
            _lib.ferrocomm_reducer_new(
                comm.handle, n, names, codes, numels, shapes, ndims, bucket_cap_mb,
                first_bucket_mb, int(bool(find_unused)), ctypes.byref(h),
            )
        )
        self._h = h.value

    def index(self, name):
        """The position of parameter `name`."""
        i = _sz()
        _check(_lib.ferrocomm_reducer_index(self._h, name.encode(), ctypes.byref(i)))
        return i.value

    def _i(self, param):
        return self.index(param) if isinstance(param, str) else int(param)

    def mark_ready(self, param, grad):
        """Hands over the gradient of `param` (a name or a position) for this step."""
        g = _buffer(grad, None, False)
        _check(_lib.ferrocomm_reducer_mark_ready(self._h, self._i(param), g[0], g[1]))

    def finish(self):
        """Ends the step; waits for every bucket's all_reduce."""
        _check(_lib.ferrocomm_reducer_finish(self._h))

    def grad(self, param, out=None):
        """The gradient of `param` after finish() (a new array, or `out`)."""
        i = self._i(param)
        if out is None:
            out = np.empty(self._shapes[i], dtype=self._dtypes[i])
        o = _buffer(out, None, True)
        _check(_lib.ferrocomm_reducer_grad(self._h, i, o[0], o[1]))
        return out

    def set_sync(self, sync):
        """Synchronise the following steps (True) or accumulate locally (False)."""
        _check(_lib.ferrocomm_reducer_set_sync(self._h, int(bool(sync))))

    @contextlib.contextmanager
    def no_sync(self):
        """`with reducer.no_sync():` steps finished inside accumulate gradients locally."""
        self.set_sync(False)
        try:
            yield self
        finally:
            self.set_sync(True)

    def close(self):
        """Releases the reducer (also done when it is garbage collected)."""
        if self._h is not None:
            h, self._h = self._h, None
            _check(_lib.ferrocomm_reducer_free(h))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "_h", None) is not None and _lib is not None:
            _lib.ferrocomm_reducer_free(self._h)


def finalize():
    """Releases every handle of the library (requests first, then communicators)."""
    _check(_lib.ferrocomm_finalize())


def sampler_indices(length, world, rank, seed=0, epoch=0, shuffle=True, drop_last=False):
    """This rank's indices (a uint64 array) into a data set of `length` examples for one
    epoch, like PyTorch's DistributedSampler (see ferrocomm_sampler_indices)."""
    flags = (0 if shuffle else SAMPLER_NO_SHUFFLE) | (SAMPLER_DROP_LAST if drop_last else 0)
    n = _sz(0)
    args = (length, world, rank, seed, epoch, flags)
    _check(_lib.ferrocomm_sampler_indices(*args, None, 0, ctypes.byref(n)))
    out = np.empty(n.value, dtype=np.uint64)
    ptr = out.ctypes.data_as(ctypes.POINTER(_u64))
    _check(_lib.ferrocomm_sampler_indices(*args, ptr, out.size, ctypes.byref(n)))
    return out
