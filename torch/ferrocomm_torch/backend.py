"""The `ferrocomm` c10d backend: a Python subclass of torch's c10d Backend over the C ABI.

Each process group gets its own ferrocomm communicator, made through the c10d store torch
hands the backend (`ferrocomm_init_with_store`), so every init method and launcher torch
supports works. Operations call the C library through ctypes, which releases the GIL while
data moves; contiguous tensors are passed by address (no copy), non-contiguous ones go
through a contiguous copy and are written back.

Collectives keep their program order: synchronous ones run in the calling thread when
nothing is queued, asynchronous ones (`async_op=True`, DDP's buckets) on the group's worker
thread; every Work's `get_future()` completes with the output tensors and `wait()` raises
the operation's error. send and recv start non-blocking transfers whose Work waits for them. Errors raise `torch.distributed.DistBackendError` naming the rank and
the operation.
"""

import collections
import ctypes
import functools
import threading
import time

import torch
import torch.distributed as dist
from torch._C import _distributed_c10d as c10d
from torch.futures import Future

from . import _lib
from ._lib import lib

RedOp = dist.ReduceOp.RedOpType

_DTYPES = {
    torch.bool: _lib.U8,
    torch.uint8: _lib.U8,
    torch.int8: _lib.I8,
    torch.int16: _lib.I16,
    torch.int32: _lib.I32,
    torch.int64: _lib.I64,
    torch.float16: _lib.F16,
    torch.bfloat16: _lib.BF16,
    torch.float32: _lib.F32,
    torch.float64: _lib.F64,
}
for _name, _code in (("uint16", _lib.U16), ("uint32", _lib.U32), ("uint64", _lib.U64)):
    if hasattr(torch, _name):
        _DTYPES[getattr(torch, _name)] = _code

_NATIVE_OPS = {
    RedOp.SUM: _lib.SUM,
    RedOp.PRODUCT: _lib.PROD,
    RedOp.MIN: _lib.MIN,
    RedOp.MAX: _lib.MAX,
    RedOp.AVG: _lib.AVG,
}
_BITWISE = {
    RedOp.BAND: torch.bitwise_and,
    RedOp.BOR: torch.bitwise_or,
    RedOp.BXOR: torch.bitwise_xor,
}
# Tag of the point-to-point messages all_to_all_single with split sizes is made of (far
# above the tags programs use).
_ALLTOALLV_TAG = 0xFFFF_FF00
# Tags of monitored_barrier's arrival messages (to rank 0) and rank 0's answers.
_MONITOR_TAG = 0xFFFF_FF01
_MONITOR_ACK_TAG = 0xFFFF_FF02


# dtypes passed to the library as they are (the fast path of all_reduce and broadcast).
_PLAIN = {d: c for d, c in _DTYPES.items() if d != torch.bool}


def _red_type(op):
    return op.op if hasattr(op, "op") else op


def _done(result):
    fut = Future()
    fut.set_result(result)
    return c10d._create_work_from_future(fut)


def _collective(method):
    """Runs a collective's body in order with the others on this process group: in the
    calling thread when torch waits for it (`opts.asyncOp` false) and nothing is queued,
    else on the group's worker thread (DDP's bucket all_reduces overlap backward). Returns
    a Work whose future completes with the body's result (the output tensors)."""

    @functools.wraps(method)
    def run(self, *args):
        opts = args[-1]
        seq = self._next_seq()
        if not getattr(opts, "asyncOp", True) or self._runner.on_worker():
            self._runner.drain()
            return _done(method(self, *args))
        return _FutureWork(
            self._runner.submit(lambda: method(self, *args)),
            self,
            method.__name__.strip("_"),
            seq,
        )

    return run


class _FutureWork(dist._Work):
    """The Work of an operation queued on the worker thread: `wait` raises its error (the
    Work of `_create_work_from_future` would report success), `get_future` is its future."""

    def __init__(self, fut, backend, what, seq):
        super().__init__()
        self._fut = fut
        self._backend = backend
        self._what = what
        self._seq = seq

    def _get_sequence_number(self):
        """The operation's sequence number in its process group (0 for the first)."""
        return self._seq

    def wait(self, timeout=None):
        secs = timeout.total_seconds() if timeout is not None else 0.0
        if secs > 0 and not self._fut.done():
            # As torch's own backends: an operation that outlives the timeout aborts the
            # process group (every later call fails too) and raises here.
            done = threading.Event()
            self._fut.add_done_callback(lambda _f: done.set())
            if not done.wait(secs):
                self._backend._abort_for(f"{self._what} did not finish within {secs:g} s")
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._backend._rank}: {self._what} did not finish "
                    f"within the wait timeout of {secs:g} s; the process group is aborted"
                )
        try:
            self._fut.wait()
        except dist.DistBackendError:
            raise
        except Exception as e:
            raise dist.DistBackendError(str(e)) from None
        return True

    def is_completed(self):
        return self._fut.done()

    def is_success(self):
        if not self._fut.done():
            return False
        try:
            self._fut.wait()
        except Exception:
            return False
        return True

    def result(self):
        self.wait()
        return self._fut.value()

    def get_future(self):
        return self._fut


class _Runner:
    """One worker thread per process group; ops keep their program order."""

    def __init__(self):
        self._cv = threading.Condition()
        self._queue = collections.deque()
        self._pending = 0
        self._thread = None
        self._stop = False

    def on_worker(self):
        return self._thread is not None and threading.current_thread() is self._thread

    def drain(self):
        """Waits until every queued operation has run (the GIL is released meanwhile)."""
        if self._pending:
            with self._cv:
                while self._pending:
                    self._cv.wait()

    def submit(self, fn):
        fut = Future()
        with self._cv:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="ferrocomm-torch", daemon=True
                )
                self._thread.start()
            self._pending += 1
            self._queue.append((fn, fut))
            self._cv.notify_all()
        return fut

    def _loop(self):
        while True:
            with self._cv:
                while not self._queue and not self._stop:
                    self._cv.wait()
                if not self._queue:
                    return
                fn, fut = self._queue.popleft()
            try:
                result = fn()
            except BaseException as e:  # the Work reports it
                err = e
                result = None
            else:
                err = None
            with self._cv:
                self._pending -= 1
                self._cv.notify_all()
            if err is None:
                fut.set_result(result)
            else:
                fut.set_exception(err)

    def stop(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        t = self._thread
        if t is not None and t is not threading.current_thread():
            t.join(timeout=60)


class _Buf:
    """A tensor as a buffer the library can use: contiguous (a copy when the tensor is
    not, written back by `finish`), complex numbers as pairs of reals, bool as bytes."""

    def __init__(self, tensor, what, rank):
        if tensor.device.type != "cpu":
            raise dist.DistBackendError(
                f"ferrocomm: rank {rank}: {what}: the tensor is on {tensor.device}; the "
                "ferrocomm backend serves CPU tensors only (use gloo or nccl for other devices, "
                "or a device-specific backend per device in init_process_group)"
            )
        self.orig = tensor
        t = tensor if tensor.is_contiguous() else tensor.contiguous()
        self.work = t
        if t.is_complex():
            t = torch.view_as_real(t)
        if t.dtype == torch.bool:
            t = t.view(torch.uint8)
        code = _DTYPES.get(t.dtype)
        if code is None:
            raise dist.DistBackendError(
                f"ferrocomm: rank {rank}: {what}: dtype {tensor.dtype} is not supported "
                f"(supported: {', '.join(str(d) for d in _DTYPES)}, and complex types)"
            )
        self.t = t
        self.dtype = code
        self.count = t.numel()
        self.ptr = t.data_ptr() if self.count else None

    def finish(self):
        if self.work is not self.orig:
            self.orig.copy_(self.work)


class FerrocommBackend(c10d.Backend):
    """A torch.distributed backend over ferrocomm (see the module docs)."""

    def __init__(self, store, rank, size, timeout):
        super().__init__(rank, size)
        self._rank = rank
        self._size = size
        self._comm = ctypes.c_void_p()
        self._runner = _Runner()
        self._timeout = timeout
        self._seq = 0
        self._seq_lock = threading.Lock()
        adapter = _lib.StoreAdapter(store)
        url = _store_url(store)
        ms = int(timeout.total_seconds() * 1000) if timeout is not None else 0
        rc = lib.ferrocomm_init_with_store(
            ctypes.byref(adapter.ops),
            size,
            rank,
            url.encode() if url else None,
            max(ms, 0),
            ctypes.byref(self._comm),
        )
        if rc != _lib.OK:
            raise dist.DistBackendError(
                f"ferrocomm: rank {rank}: joining the process group of {size} ranks failed: "
                f"{_lib.last_error()}"
            )

    def getBackendName(self):  # noqa: N802 (the c10d name)
        return "ferrocomm"

    @property
    def supports_splitting(self):
        # split_group / new_group(split) make a child communicator through the store.
        return True

    @property
    def options(self):
        # c10d's split reads the parent's options (the property of the C++ base would
        # call back into this class without end).
        opts = c10d.Backend.Options("ferrocomm")
        if self._timeout is not None:
            opts._timeout = self._timeout
        return opts

    def split(self, store, ranks, opts):
        """The backend of a sub-group of this group's ranks (`dist.split_group`): a new
        communicator made through `store` (c10d prefixes it per sub-group).

        torch calls this on a rank that is in none of the splits too, and cannot take "no
        backend" back from a Python backend (it crashes), so such a rank gets an error."""
        ranks = list(ranks)
        if self._rank not in ranks:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: split_group: this rank is in none of the "
                "splits; with the ferrocomm backend every rank of the parent group must be "
                "in one split (give ranks that need no sub-group a split of their own)"
            )
        timeout = getattr(opts, "_timeout", None) if opts is not None else None
        return FerrocommBackend(
            store, ranks.index(self._rank), len(ranks), timeout or self._timeout
        )

    def perform_nocolor_split(self, device):
        """What c10d asks of a rank outside a new group made by splitting (a process group
        bound to a device): nothing, as a sub-group's communicator is a rendezvous of its
        members only."""
        return None

    def _next_seq(self):
        with self._seq_lock:
            seq = self._seq
            self._seq += 1
        return seq

    def _get_sequence_number_for_group(self):
        """How many operations this rank has issued on the group (each Work's
        `_get_sequence_number()` is its operation's place in that count)."""
        return self._seq

    @property
    def supports_coalescing(self):
        # Batched point-to-point operations are issued one by one (they do not block).
        return False

    # ---- plumbing -------------------------------------------------------------------

    def _fail(self, what, rc=None):
        msg = _lib.last_error() if rc is not None else ""
        return dist.DistBackendError(f"ferrocomm: rank {self._rank}: {what} failed: {msg}")

    def _call(self, what, fn, *args):
        if not self._comm:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: the process group was shut down"
            )
        rc = fn(self._comm, *args)
        if rc != _lib.OK:
            raise self._fail(what, rc)

    def _buf(self, tensor, what):
        return _Buf(tensor, what, self._rank)

    def _one(self, tensors, what):
        if len(tensors) != 1:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: expected one tensor per call, got "
                f"{len(tensors)}"
            )
        return tensors[0]

    def _op(self, reduce_op, buf, what):
        t = _red_type(reduce_op)
        if buf.orig.dtype == torch.bool:
            if t in (RedOp.SUM, RedOp.MAX, RedOp.BOR):
                return _lib.MAX
            if t in (RedOp.PRODUCT, RedOp.MIN, RedOp.BAND):
                return _lib.MIN
        if t in _NATIVE_OPS:
            if t == RedOp.AVG and not (buf.orig.is_floating_point() or buf.orig.is_complex()):
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: ReduceOp.AVG needs a floating-point "
                    f"tensor, got {buf.orig.dtype}"
                )
            if buf.orig.is_complex() and t not in (RedOp.SUM, RedOp.AVG):
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: complex tensors support SUM and "
                    f"AVG only, got {t.name}"
                )
            return _NATIVE_OPS[t]
        if t == RedOp.PREMUL_SUM:
            if not (buf.orig.is_floating_point() or buf.orig.is_complex()):
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: PREMUL_SUM needs a floating-point "
                    f"tensor, got {buf.orig.dtype}"
                )
            buf.work.mul_(reduce_op.factor)
            return _lib.SUM
        if t in _BITWISE:
            if buf.orig.is_floating_point() or buf.orig.is_complex():
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: ReduceOp.{t.name} needs an integer "
                    f"or bool tensor, got {buf.orig.dtype}"
                )
            return None
        raise dist.DistBackendError(
            f"ferrocomm: rank {self._rank}: {what}: ReduceOp.{t.name} is not supported by "
            "the ferrocomm backend (supported: SUM, PRODUCT, MIN, MAX, AVG, PREMUL_SUM, BAND, BOR, BXOR)"
        )

    def _bitwise_allreduce(self, buf, reduce_op, what):
        """BAND/BOR/BXOR on integers: all_gather, then reduce locally (in rank order).

        ferrocomm has no bitwise reduction, so the all_gather's own fingerprint cannot tell
        BAND from BOR: each rank's block carries its operation in a trailing byte, and when
        the ranks disagree every rank raises (never a success with mixed operations)."""
        red = _red_type(reduce_op)
        nbytes = buf.count * buf.t.element_size()
        mine = torch.empty(nbytes + 1, dtype=torch.uint8)
        mine[:nbytes].copy_(buf.t.reshape(-1).view(torch.uint8))
        mine[nbytes] = int(red)
        gathered = torch.empty((self._size, nbytes + 1), dtype=torch.uint8)
        self._call(
            what, lib.ferrocomm_allgather, mine.data_ptr(), gathered.data_ptr(), nbytes + 1,
            _lib.U8,
        )
        ops = [int(c) for c in gathered[:, nbytes]]
        for r, o in enumerate(ops):
            if o != int(red):
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: collective mismatch: rank "
                    f"{self._rank} reduces with {red} but rank {r} with "
                    f"{dist.ReduceOp.RedOpType(o)}; every rank must pass the same op"
                )
        blocks = gathered[:, :nbytes].reshape(-1).view(buf.t.dtype).reshape(
            (self._size,) + tuple(buf.t.shape)
        )
        out = functools.reduce(_BITWISE[red], list(blocks.unbind(0)))
        buf.t.copy_(out)

    # ---- collectives ----------------------------------------------------------------

    @_collective
    def allreduce(self, tensors, opts):
        if len(tensors) == 1 and self._comm:
            # Fast path: a contiguous CPU tensor of a plain type and a native operation.
            t = tensors[0]
            code = _PLAIN.get(t.dtype)
            op = _NATIVE_OPS.get(opts.reduceOp.op)
            if (
                code is not None
                and op is not None
                and (op != _lib.AVG or code >= _lib.F16)
                and t.is_cpu
                and t.is_contiguous()
            ):
                n = t.numel()
                p = t.data_ptr() if n else None
                if lib.ferrocomm_allreduce(self._comm, p, p, n, code, op) != _lib.OK:
                    raise self._fail("all_reduce", 1)
                return tensors
        what = "all_reduce"
        self._allreduce_one(self._one(tensors, what), opts.reduceOp, what)
        return tensors

    @_collective
    def allreduce_coalesced(self, tensors, opts):
        for t in tensors:
            self._allreduce_one(t, opts.reduceOp, "all_reduce_coalesced")
        return tensors

    def _allreduce_one(self, tensor, reduce_op, what):
        """All-reduces one tensor in place: natively, or as an all_gather and a local
        reduction for the bitwise ops ferrocomm does not have."""
        b = self._buf(tensor, what)
        op = self._op(reduce_op, b, what)
        if op is None:
            self._bitwise_allreduce(b, reduce_op, what)
        else:
            self._call(what, lib.ferrocomm_allreduce, b.ptr, b.ptr, b.count, b.dtype, op)
        b.finish()

    @_collective
    def broadcast(self, tensors, opts):
        what = f"broadcast from rank {opts.rootRank}"
        b = self._buf(self._one(tensors, what), what)
        self._call(what, lib.ferrocomm_broadcast, b.ptr, b.count, b.dtype, opts.rootRank)
        b.finish()
        return tensors

    @_collective
    def reduce(self, tensors, opts):
        what = f"reduce to rank {opts.rootRank}"
        b = self._buf(self._one(tensors, what), what)
        op = self._op(opts.reduceOp, b, what)
        if op is None:
            # Bitwise: every rank computes the result, the root keeps it.
            keep = b.t.clone()
            self._bitwise_allreduce(b, opts.reduceOp, what)
            if self._rank != opts.rootRank:
                b.t.copy_(keep)
        else:
            self._call(
                what, lib.ferrocomm_reduce, b.ptr, b.ptr, b.count, b.dtype, op, opts.rootRank
            )
        b.finish()
        return tensors

    def _allgather_flat(self, out_flat, inp, what):
        b = self._buf(inp, what)
        ob = self._buf(out_flat, what)
        if ob.count != b.count * self._size:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: the output holds {ob.count} elements, "
                f"expected {self._size} x {b.count}"
            )
        self._call(what, lib.ferrocomm_allgather, b.ptr, ob.ptr, b.count, b.dtype)
        ob.finish()

    @_collective
    def allgather(self, output_tensors, input_tensors, opts):
        what = "all_gather"
        inp = self._one(input_tensors, what)
        outs = self._one(output_tensors, what)
        if len(outs) != self._size:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: got {len(outs)} output tensors for "
                f"{self._size} ranks"
            )
        flat = torch.empty((self._size,) + tuple(inp.shape), dtype=inp.dtype)
        self._allgather_flat(flat, inp, what)
        for i, o in enumerate(outs):
            o.copy_(flat[i].view(o.shape) if o.numel() == inp.numel() else flat[i])
        return output_tensors

    @_collective
    def _allgather_base(self, output, input, opts):
        self._allgather_flat(output, input, "all_gather_into_tensor")
        return [output]

    @_collective
    def allgather_into_tensor_coalesced(self, outputs, inputs, opts):
        for o, i in zip(outputs, inputs):
            self._allgather_flat(o, i, "all_gather_into_tensor_coalesced")
        return outputs

    def _reduce_scatter_flat(self, out, inp_flat, reduce_op, what):
        ob = self._buf(out, what)
        ib = self._buf(inp_flat, what)
        if ib.count != ob.count * self._size:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: the input holds {ib.count} elements, "
                f"expected {self._size} x {ob.count}"
            )
        op = self._op(reduce_op, ob, what)
        if op is None:
            whole = ib.t.clone()
            self._bitwise_allreduce(_Buf(whole, what, self._rank), reduce_op, what)
            ob.t.copy_(whole.view(self._size, -1)[self._rank].view(ob.t.shape))
        else:
            self._call(what, lib.ferrocomm_reduce_scatter, ib.ptr, ob.ptr, ob.count, ob.dtype, op)
        ob.finish()

    @_collective
    def reduce_scatter(self, output_tensors, input_tensors, opts):
        what = "reduce_scatter"
        out = self._one(output_tensors, what)
        ins = self._one(input_tensors, what)
        flat = torch.stack([i.reshape(out.shape) for i in ins])
        self._reduce_scatter_flat(out, flat, opts.reduceOp, what)
        return output_tensors

    @_collective
    def _reduce_scatter_base(self, output, input, opts):
        self._reduce_scatter_flat(output, input, opts.reduceOp, "reduce_scatter_tensor")
        return [output]

    @_collective
    def reduce_scatter_tensor_coalesced(self, outputs, inputs, opts):
        for o, i in zip(outputs, inputs):
            self._reduce_scatter_flat(o, i, opts.reduceOp, "reduce_scatter_tensor_coalesced")
        return outputs

    @_collective
    def gather(self, output_tensors, input_tensors, opts):
        root = opts.rootRank
        what = f"gather to rank {root}"
        inp = self._one(input_tensors, what)
        b = self._buf(inp, what)
        if self._rank == root:
            outs = self._one(output_tensors, what)
            flat = torch.empty((self._size,) + tuple(b.t.shape), dtype=b.t.dtype)
            self._call(
                what, lib.ferrocomm_gather, b.ptr, flat.data_ptr() if b.count else None,
                b.count, b.dtype, root,
            )
            for i, o in enumerate(outs):
                src = flat[i]
                if o.dtype == torch.bool:
                    src = src.view(torch.bool)
                elif o.is_complex():
                    src = torch.view_as_complex(src)
                o.copy_(src.view(o.shape))
        else:
            self._call(what, lib.ferrocomm_gather, b.ptr, None, b.count, b.dtype, root)
        return output_tensors

    @_collective
    def scatter(self, output_tensors, input_tensors, opts):
        root = opts.rootRank
        what = f"scatter from rank {root}"
        out = self._one(output_tensors, what)
        ob = self._buf(out, what)
        if self._rank == root:
            ins = self._one(input_tensors, what)
            flat = torch.stack([self._buf(i, what).t.reshape(ob.t.shape) for i in ins])
            self._call(
                what, lib.ferrocomm_scatter, flat.data_ptr() if ob.count else None, ob.ptr,
                ob.count, ob.dtype, root,
            )
        else:
            self._call(what, lib.ferrocomm_scatter, None, ob.ptr, ob.count, ob.dtype, root)
        ob.finish()
        return output_tensors

    @_collective
    def alltoall(self, output_tensors, input_tensors, opts):
        what = "all_to_all"
        if len(output_tensors) != self._size or len(input_tensors) != self._size:
            raise dist.DistBackendError(
                f"ferrocomm: rank {self._rank}: {what}: expected {self._size} input and output "
                f"tensors, got {len(input_tensors)} and {len(output_tensors)}"
            )
        sizes_in = [t.numel() for t in input_tensors]
        sizes_out = [t.numel() for t in output_tensors]
        inp = torch.cat([t.reshape(-1) for t in input_tensors])
        out = torch.empty(sum(sizes_out), dtype=output_tensors[0].dtype)
        self._alltoallv(out, inp, sizes_out, sizes_in, what)
        for o, piece in zip(output_tensors, out.split(sizes_out)):
            o.copy_(piece.view(o.shape))
        return output_tensors

    @_collective
    def alltoall_base(self, output, input, output_split_sizes, input_split_sizes, opts):
        what = "all_to_all_single"
        n = self._size
        if not output_split_sizes and not input_split_sizes:
            ob, ib = self._buf(output, what), self._buf(input, what)
            if ib.count % n or ob.count != ib.count:
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: {ib.count} input and {ob.count} "
                    f"output elements cannot be split evenly among {n} ranks"
                )
            self._call(what, lib.ferrocomm_alltoall, ib.ptr, ob.ptr, ib.count // n, ib.dtype)
            ob.finish()
            return [output]
        row_out = output[0].numel() if output.dim() > 0 and output.shape[0] else 1
        row_in = input[0].numel() if input.dim() > 0 and input.shape[0] else 1
        outs = [s * row_out for s in output_split_sizes] or [output.numel() // n] * n
        ins = [s * row_in for s in input_split_sizes] or [input.numel() // n] * n
        out = output.reshape(-1) if output.is_contiguous() else output.contiguous().view(-1)
        self._alltoallv(out, input.contiguous().view(-1), outs, ins, what)
        if out.data_ptr() != output.data_ptr():
            output.copy_(out.view(output.shape))
        return [output]

    def _alltoallv(self, out, inp, outs, ins, what):
        """all_to_all with counts per peer, as non-blocking sends and receives."""
        ib = self._buf(inp, what)
        ob = self._buf(out, what)
        # Library elements per tensor element (2 for complex: pairs of reals).
        per = 2 if inp.is_complex() else 1
        esize = ib.t.element_size() * per
        reqs = []
        try:
            o_off = 0
            for peer, cnt in enumerate(outs):
                req = ctypes.c_void_p()
                ptr = ob.ptr + o_off * esize if cnt else None
                self._call(what, lib.ferrocomm_irecv, ptr, cnt * per, ob.dtype, peer,
                           _ALLTOALLV_TAG, ctypes.byref(req))
                reqs.append(req)
                o_off += cnt
            i_off = 0
            for peer, cnt in enumerate(ins):
                req = ctypes.c_void_p()
                ptr = ib.ptr + i_off * esize if cnt else None
                self._call(what, lib.ferrocomm_isend, ptr, cnt * per, ib.dtype, peer,
                           _ALLTOALLV_TAG, ctypes.byref(req))
                reqs.append(req)
                i_off += cnt
        except BaseException:
            for r in reqs:
                lib.ferrocomm_request_free(r)
            raise
        arr = (ctypes.c_void_p * len(reqs))(*[r.value for r in reqs])
        sts = (_lib.Status * len(reqs))()
        rc = lib.ferrocomm_waitall(len(reqs), arr, sts)
        if rc != _lib.OK:
            raise self._fail(what, rc)
        ob.finish()

    # The names torch 2.15 dispatches to (older ones above stay for older torch).
    def all_gather_single(self, output, input, opts):
        return self._allgather_base(output, input, opts)

    def all_gather_single_coalesced(self, outputs, inputs, opts):
        return self.allgather_into_tensor_coalesced(outputs, inputs, opts)

    def reduce_scatter_single(self, output, input, opts):
        return self._reduce_scatter_base(output, input, opts)

    def reduce_scatter_single_coalesced(self, outputs, inputs, opts):
        return self.reduce_scatter_tensor_coalesced(outputs, inputs, opts)

    def all_to_all_single(self, output, input, output_split_sizes, input_split_sizes, opts):
        return self.alltoall_base(output, input, output_split_sizes, input_split_sizes, opts)

    @_collective
    def gather_single(self, output, input, opts):
        root = opts.rootRank
        what = f"gather_into_tensor to rank {root}"
        b = self._buf(input, what)
        if self._rank == root:
            ob = self._buf(output, what)
            if ob.count != b.count * self._size:
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: the output holds {ob.count} "
                    f"elements, expected {self._size} x {b.count}"
                )
            self._call(what, lib.ferrocomm_gather, b.ptr, ob.ptr, b.count, b.dtype, root)
            ob.finish()
        else:
            self._call(what, lib.ferrocomm_gather, b.ptr, None, b.count, b.dtype, root)
        return [output] if output is not None else []

    @_collective
    def barrier(self, opts):
        self._call("barrier", lib.ferrocomm_barrier)
        return []

    def monitored_barrier(self, opts=None, wait_all_ranks=False):
        """A barrier that names the ranks that did not reach it (`dist.monitored_barrier`).

        Every rank but 0 tells rank 0 it arrived and waits for its answer; rank 0 waits up
        to the timeout (`opts.timeout`) for all of them. When some rank is missing, rank 0
        raises an error naming it (all missing ranks with `wait_all_ranks`, else the
        lowest), and the ranks that did arrive get an error saying rank 0 reported missing
        ranks; a rank whose answer from rank 0 does not come within twice the timeout
        raises naming rank 0."""
        self._runner.drain()
        self._next_seq()
        # torch passes BarrierOptions (its `timeout`); a direct call may pass a timedelta.
        timeout = getattr(opts, "timeout", opts)
        secs = timeout.total_seconds() if timeout is not None else -1.0
        if secs <= 0 and self._timeout is not None:
            secs = self._timeout.total_seconds()
        if secs <= 0:
            secs = 1800.0
        what = "monitored_barrier"
        if self._size == 1:
            return None
        if self._rank != 0:
            token = torch.zeros(1, dtype=torch.uint8)
            answer = torch.zeros(1, dtype=torch.uint8)
            reqs = [self._start(what, lib.ferrocomm_isend, token, 0, _MONITOR_TAG)]
            reqs.append(self._start(what, lib.ferrocomm_irecv, answer, 0, _MONITOR_ACK_TAG))
            # Twice the timeout: rank 0's verdict on a missing rank comes after one.
            missing = self._poll(reqs, 2 * secs, what)
            if missing:
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: rank 0 did not answer within "
                    f"{2 * secs:g} s (twice the timeout): rank 0 did not reach the barrier"
                )
            if answer.item():
                raise dist.DistBackendError(
                    f"ferrocomm: rank {self._rank}: {what}: rank 0 reports that some ranks "
                    f"did not reach the barrier within {secs:g} s (rank 0's error names them)"
                )
            return None
        tokens = torch.zeros(self._size, dtype=torch.uint8)
        reqs = [
            self._start(what, lib.ferrocomm_irecv, tokens[r : r + 1], r, _MONITOR_TAG)
            for r in range(1, self._size)
        ]
        pending = self._poll(reqs, secs, what)
        missing = [r + 1 for r, req in enumerate(pending) if req is not None] if pending else []
        verdict = torch.tensor([1 if missing else 0], dtype=torch.uint8)
        acks = [
            self._start(what, lib.ferrocomm_isend, verdict, r, _MONITOR_ACK_TAG)
            for r in range(1, self._size)
            if r not in missing
        ]
        if self._poll(acks, secs, what):
            raise dist.DistBackendError(
                f"ferrocomm: rank 0: {what}: could not answer the ranks within {secs:g} s"
            )
        if missing:
            named = missing if wait_all_ranks else missing[:1]
            ranks = ", ".join(str(r) for r in named)
            raise dist.DistBackendError(
                f"ferrocomm: rank 0: {what}: rank{'s' if len(named) > 1 else ''} {ranks} "
                f"did not reach the barrier within {secs:g} s (check that rank"
                f"{'s' if len(named) > 1 else ''} for a hang or an earlier error)"
            )
        return None

    def _start(self, what, fn, tensor, peer, tag):
        req = ctypes.c_void_p()
        self._call(what, fn, tensor.data_ptr(), 1, _lib.U8, peer, tag, ctypes.byref(req))
        return req

    def _poll(self, reqs, secs, what):
        """Tests `reqs` until all end or `secs` pass (sleeping between rounds, the GIL
        released). Returns None when all ended, else the list with the unfinished requests
        (freed, so withdrawn) in place and None for the finished ones."""
        deadline = time.monotonic() + secs
        pending = list(reqs)
        nap = 0.0005
        done = ctypes.c_int()
        st = _lib.Status()
        while True:
            for i, req in enumerate(pending):
                if req is None:
                    continue
                rc = lib.ferrocomm_test(req, ctypes.byref(done), ctypes.byref(st))
                if done.value:
                    pending[i] = None
                    if rc != _lib.OK:
                        for other in pending:
                            if other is not None:
                                lib.ferrocomm_request_free(other)
                        raise self._fail(what, rc)
            if all(r is None for r in pending):
                return None
            if time.monotonic() >= deadline:
                for r in pending:
                    if r is not None:
                        lib.ferrocomm_request_free(r)
                return pending
            time.sleep(nap)
            nap = min(nap * 2, 0.01)

    # ---- point to point -------------------------------------------------------------

    def send(self, tensors, dst, tag):
        self._runner.drain()
        what = f"send to rank {dst} (tag {tag})"
        b = self._buf(self._one(tensors, what), what)
        req = ctypes.c_void_p()
        self._call(what, lib.ferrocomm_isend, b.ptr, b.count, b.dtype, dst, tag, ctypes.byref(req))
        return _P2PWork(self, req, tensors, b, what, self._next_seq())

    def recv(self, tensors, src, tag):
        self._runner.drain()
        what = f"recv from rank {src} (tag {tag})"
        b = self._buf(self._one(tensors, what), what)
        req = ctypes.c_void_p()
        self._call(what, lib.ferrocomm_irecv, b.ptr, b.count, b.dtype, src, tag, ctypes.byref(req))
        return _P2PWork(self, req, tensors, b, what, self._next_seq())

    def recv_anysource(self, tensors, tag):
        self._runner.drain()
        what = f"recv from any rank (tag {tag})"
        b = self._buf(self._one(tensors, what), what)
        req = ctypes.c_void_p()
        self._call(
            what, lib.ferrocomm_irecv, b.ptr, b.count, b.dtype, _lib.ANY_SOURCE, tag,
            ctypes.byref(req),
        )
        return _P2PWork(self, req, tensors, b, what, self._next_seq())

    # ---- lifetime -------------------------------------------------------------------

    def _abort_for(self, reason):
        if self._comm:
            lib.ferrocomm_comm_abort(self._comm, reason.encode())

    def abort(self):
        if self._comm:
            lib.ferrocomm_comm_abort(self._comm, b"torch.distributed abort")
        self.shutdown()

    def shutdown(self):
        runner = getattr(self, "_runner", None)
        if runner is not None:
            runner.drain()
            runner.stop()
        if self._comm:
            lib.ferrocomm_comm_free(self._comm)
            self._comm = ctypes.c_void_p()

    def __del__(self):
        try:
            self.shutdown()
        except Exception:
            pass


class _P2PWork(dist._Work):
    """A send or receive in flight: `wait` finishes it."""

    def __init__(self, backend, req, tensors, buf, what, seq):
        super().__init__()
        self._seq = seq
        self._backend = backend
        self._req = req
        self._tensors = tensors
        self._b = buf
        self._what = what
        self._src = -1
        self._fut = None

    def wait(self, timeout=None):
        if self._req:
            st = _lib.Status()
            req, self._req = self._req, None
            rc = lib.ferrocomm_wait(req, ctypes.byref(st))
            if rc != _lib.OK:
                raise self._backend._fail(self._what, rc)
            self._src = st.source
            self._b.finish()
        return True

    def is_completed(self):
        return not self._req

    def _get_sequence_number(self):
        """The operation's sequence number in its process group."""
        return self._seq

    def is_success(self):
        return True

    def source_rank(self):
        self.wait()
        return self._src

    def _source_rank(self):
        return self.source_rank()

    def result(self):
        self.wait()
        return self._tensors

    def get_future(self):
        self.wait()
        if self._fut is None:
            self._fut = Future()
            self._fut.set_result(self._tensors)
        return self._fut

    def __del__(self):
        if self._req:
            lib.ferrocomm_request_free(self._req)
            self._req = None


def _store_url(store):
    """`tcp://HOST:PORT` of the TCPStore under `store` (wrapped in PrefixStores), to pick
    the interface the transports listen on; None for other stores."""
    s = store
    for _ in range(16):
        if isinstance(s, dist.PrefixStore):
            s = s.underlying_store
        else:
            break
    if isinstance(s, dist.TCPStore):
        host = s.host
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        return f"tcp://{host}:{s.port}"
    return None


def create(store, rank, size, timeout):
    """The creator function torch.distributed calls for each process group."""
    return FerrocommBackend(store, rank, size, timeout)
