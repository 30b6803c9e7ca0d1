"""ctypes bindings of the parts of libferrocomm.so the backend uses, and a c10d store
exposed to the library as `ferrocomm_store_ops` callbacks.

What this layer assumes of the C ABI (ffi/include/ferrocomm.h): the result codes, the
data type codes FERROCOMM_U8..FERROCOMM_F64 = 0x100..0x10B, the operation codes
SUM, PROD, MAX, MIN, AVG = 0x200..0x204 (fixed by the ABI, disjoint so that a swap fails), FERROCOMM_ANY_SOURCE = -1, the status struct
(source, bytes, tag, error), and the signatures bound in `_bind` below.

The library is found through FERROCOMM_LIB (a path), else the cargo build directory of the
source checkout this package lives in (target/release, then target/debug), else the
system's search path.
"""

import ctypes
import ctypes.util
import datetime
import os
import threading

OK = 0
ERR_TIMEOUT = 5
ERR_PEER_LOST = 6

# ferrocomm_dtype codes.
U8, I8, U16, I16, U32, I32, U64, I64, F16, BF16, F32, F64 = range(0x100, 0x10C)
# ferrocomm_op codes.
SUM, PROD, MAX, MIN, AVG = range(0x200, 0x205)
ANY_SOURCE = -1

STORE_OK, STORE_TIMEOUT, STORE_ERROR = 0, 1, 2

_c = ctypes
_vp = _c.c_void_p
_sz = _c.c_size_t
_i64 = _c.c_int64
_u32 = _c.c_uint32


class Status(_c.Structure):
    """ferrocomm_status_t."""

    _fields_ = [("source", _sz), ("bytes", _sz), ("tag", _u32), ("error", _u32)]


SINK = _c.CFUNCTYPE(None, _vp, _c.POINTER(_c.c_uint8), _sz)
_SET = _c.CFUNCTYPE(_c.c_int32, _vp, _c.c_char_p, _c.POINTER(_c.c_uint8), _sz, SINK, _vp)
_GET = _c.CFUNCTYPE(_c.c_int32, _vp, _c.c_char_p, _i64, SINK, _vp)
_ADD = _c.CFUNCTYPE(_c.c_int32, _vp, _c.c_char_p, _i64, _c.POINTER(_i64), SINK, _vp)
_CAS = _c.CFUNCTYPE(
    _c.c_int32,
    _vp,
    _c.c_char_p,
    _c.POINTER(_c.c_uint8),
    _sz,
    _c.c_int32,
    _c.POINTER(_c.c_uint8),
    _sz,
    SINK,
    _vp,
)
_WAIT = _c.CFUNCTYPE(_c.c_int32, _vp, _c.POINTER(_c.c_char_p), _sz, _i64, SINK, _vp)
_CHECK = _c.CFUNCTYPE(
    _c.c_int32, _vp, _c.POINTER(_c.c_char_p), _sz, _c.POINTER(_c.c_uint8), SINK, _vp
)
_DELETE = _c.CFUNCTYPE(_c.c_int32, _vp, _c.c_char_p, _c.POINTER(_c.c_uint8), SINK, _vp)
_RELEASE = _c.CFUNCTYPE(None, _vp)


class StoreOps(_c.Structure):
    """ferrocomm_store_ops."""

    _fields_ = [
        ("ctx", _vp),
        ("set", _SET),
        ("get", _GET),
        ("add", _ADD),
        ("compare_set", _CAS),
        ("wait", _WAIT),
        ("check", _CHECK),
        ("delete_key", _DELETE),
        ("release", _RELEASE),
    ]


def _candidates():
    env = os.environ.get("FERROCOMM_LIB")
    if env:
        yield env
        return
    here = os.path.dirname(os.path.abspath(__file__))
    # A source checkout: torch/ferrocomm_torch/_lib.py -> target/{release,debug}.
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
        "ferrocomm_torch: cannot find libferrocomm.so (tried: "
        + ", ".join(tried)
        + "); build it with `cargo build --release -p ferrocomm-ffi` or set FERROCOMM_LIB"
    )


def _bind(lib):
    p = _c.POINTER
    sigs = {
        "ferrocomm_last_error": ([], _c.c_char_p),
        "ferrocomm_init_with_store": (
            [p(StoreOps), _i64, _i64, _c.c_char_p, _i64, p(_vp)],
            _u32,
        ),
        "ferrocomm_comm_free": ([_vp], _u32),
        "ferrocomm_comm_abort": ([_vp, _c.c_char_p], _u32),
        "ferrocomm_barrier": ([_vp], _u32),
        "ferrocomm_allreduce": ([_vp, _vp, _vp, _sz, _u32, _u32], _u32),
        "ferrocomm_broadcast": ([_vp, _vp, _sz, _u32, _sz], _u32),
        "ferrocomm_reduce": ([_vp, _vp, _vp, _sz, _u32, _u32, _sz], _u32),
        "ferrocomm_allgather": ([_vp, _vp, _vp, _sz, _u32], _u32),
        "ferrocomm_reduce_scatter": ([_vp, _vp, _vp, _sz, _u32, _u32], _u32),
        "ferrocomm_gather": ([_vp, _vp, _vp, _sz, _u32, _sz], _u32),
        "ferrocomm_scatter": ([_vp, _vp, _vp, _sz, _u32, _sz], _u32),
        "ferrocomm_alltoall": ([_vp, _vp, _vp, _sz, _u32], _u32),
        "ferrocomm_isend": ([_vp, _vp, _sz, _u32, _sz, _u32, p(_vp)], _u32),
        "ferrocomm_irecv": ([_vp, _vp, _sz, _u32, _i64, _i64, p(_vp)], _u32),
        "ferrocomm_wait": ([_vp, p(Status)], _u32),
        "ferrocomm_test": ([_vp, p(_c.c_int), p(Status)], _u32),
        "ferrocomm_waitall": ([_sz, p(_vp), p(Status)], _u32),
        "ferrocomm_request_free": ([_vp], _u32),
    }
    for name, (args, res) in sigs.items():
        f = getattr(lib, name)
        f.argtypes = args
        f.restype = res
    return lib


lib = _bind(_load())


def last_error():
    """The library's message for the most recent failure on this thread."""
    msg = lib.ferrocomm_last_error()
    return msg.decode("utf-8", "replace") if msg else "(no message)"


# Store adapters alive in the library, by context id; removed by `release`.
_live = {}
_live_lock = threading.Lock()
_next_id = [1]


def _put(sink, sink_ctx, data):
    buf = (_c.c_uint8 * len(data)).from_buffer_copy(data) if data else None
    sink(sink_ctx, buf, len(data))


def _is_timeout(e):
    text = str(e).lower()
    return "timeout" in text or "timed out" in text


class StoreAdapter:
    """A torch.distributed Store as `ferrocomm_store_ops`; kept alive until the library
    releases it."""

    def __init__(self, store):
        self.store = store
        with _live_lock:
            self.id = _next_id[0]
            _next_id[0] += 1
            _live[self.id] = self
        self.ops = StoreOps(
            _vp(self.id),
            _SET(self._set),
            _GET(self._get),
            _ADD(self._add),
            _CAS(self._cas),
            _WAIT(self._wait),
            _CHECK(self._check),
            _DELETE(self._delete),
            _RELEASE_FN,
        )

    @staticmethod
    def _guard(sink, sink_ctx, fn):
        try:
            fn()
            return STORE_OK
        except Exception as e:  # every failure goes back to the library as a code
            if _is_timeout(e):
                return STORE_TIMEOUT
            _put(sink, sink_ctx, f"{type(e).__name__}: {e}".encode())
            return STORE_ERROR

    def _set(self, _ctx, key, value, n, sink, sink_ctx):
        return self._guard(
            sink, sink_ctx, lambda: self.store.set(key.decode(), _c.string_at(value, n) if n else b"")
        )

    def _get(self, _ctx, key, timeout_ms, sink, sink_ctx):
        def run():
            k = key.decode()
            self.store.wait([k], datetime.timedelta(milliseconds=max(timeout_ms, 1)))
            _put(sink, sink_ctx, self.store.get(k))

        return self._guard(sink, sink_ctx, run)

    def _add(self, _ctx, key, delta, result, sink, sink_ctx):
        def run():
            result[0] = self.store.add(key.decode(), delta)

        return self._guard(sink, sink_ctx, run)

    def _cas(self, _ctx, key, exp, exp_n, _present, des, des_n, sink, sink_ctx):
        # c10d: an empty expected value means "the key is absent".
        def run():
            e = _c.string_at(exp, exp_n) if exp_n else b""
            d = _c.string_at(des, des_n) if des_n else b""
            _put(sink, sink_ctx, self.store.compare_set(key.decode(), e, d))

        return self._guard(sink, sink_ctx, run)

    def _wait(self, _ctx, keys, n, timeout_ms, sink, sink_ctx):
        def run():
            ks = [keys[i].decode() for i in range(n)]
            self.store.wait(ks, datetime.timedelta(milliseconds=max(timeout_ms, 1)))

        return self._guard(sink, sink_ctx, run)

    def _check(self, _ctx, keys, n, present, sink, sink_ctx):
        def run():
            for i in range(n):
                present[i] = 1 if self.store.check([keys[i].decode()]) else 0

        return self._guard(sink, sink_ctx, run)

    def _delete(self, _ctx, key, existed, sink, sink_ctx):
        def run():
            existed[0] = 1 if self.store.delete_key(key.decode()) else 0

        return self._guard(sink, sink_ctx, run)


def _release_impl(ctx):
    with _live_lock:
        _live.pop(ctx, None)


# One module-level callback object: it must outlive every call of it, including the call
# that drops the adapter it belongs to.
_RELEASE_FN = _RELEASE(_release_impl)
