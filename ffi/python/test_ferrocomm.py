"""Tests of the Python module in one process (a world of one rank over a file store).

    FERROCOMM_LIB=target/release/libferrocomm.so python3 ffi/python/test_ferrocomm.py

Multi-rank runs are in ffi/tests/examples.rs (ffi/examples/ring.py under ferrorun).
"""

import ctypes
import gc
import os
import sys
import tempfile
import unittest

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ferrocomm  # noqa: E402


class OneRank(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        url = f"file://{cls.dir.name}/store"
        cls.comm = ferrocomm.Communicator.init(url, world_size=1, rank=0)

    @classmethod
    def tearDownClass(cls):
        cls.comm.close()
        cls.dir.cleanup()

    def test_queries(self):
        c = self.comm
        self.assertEqual((c.rank, c.size, c.local_rank, c.local_size, c.node_index), (0, 1, 0, 1, 0))
        self.assertRegex(ferrocomm.version(), r"^\d+\.\d+\.\d+")

    def test_every_dtype_to_self(self):
        for dt in [np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.uint64,
                   np.int64, np.float16, np.float32, np.float64]:
            out = (np.arange(10) * 3).astype(dt)
            inp = np.zeros(10, dtype=dt)
            r = self.comm.irecv(inp, 0, tag=4)
            self.comm.send(out, 0, tag=4)
            st = r.wait()
            self.assertEqual((st.source, st.tag, st.bytes, st.error), (0, 4, out.nbytes, 0))
            np.testing.assert_array_equal(inp, out)
        # bfloat16 as uint16 bit patterns.
        bits = np.array([0x3F80, 0x4000], dtype=np.uint16)  # 1.0, 2.0
        got = np.zeros(2, dtype=np.uint16)
        st = self.comm.sendrecv(bits, 0, got, 0, sendtag=1, recvtag=1, dtype="bf16")
        np.testing.assert_array_equal(got, bits)
        self.assertEqual(st.bytes, 4)

    def test_nonblocking_test_and_waitall(self):
        a = np.arange(100, dtype=np.float64)
        b = np.zeros(100, dtype=np.float64)
        r = self.comm.irecv(b, ferrocomm.ANY_SOURCE, ferrocomm.ANY_TAG)
        self.assertIsNone(r.test(), "nothing sent yet")
        s = self.comm.isend(a, 0, tag=9)
        sts = ferrocomm.waitall([r, s])
        self.assertEqual(sts[0].tag, 9)
        self.assertEqual(sts[1].bytes, 800)
        np.testing.assert_array_equal(a, b)
        self.assertTrue(r.done and s.done)
        with self.assertRaises(ferrocomm.Error) as e:
            r.wait()
        self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_HANDLE)

    def test_a_dropped_receive_is_withdrawn(self):
        buf = np.zeros(4, dtype=np.int32)
        r = self.comm.irecv(buf, 0, tag=77)
        del r
        gc.collect()
        # The withdrawn receive does not take this message.
        self.comm.send(np.array([5, 6, 7, 8], dtype=np.int32), 0, tag=77)
        got = np.zeros(4, dtype=np.int32)
        self.comm.recv(got, 0, 77)
        np.testing.assert_array_equal(got, [5, 6, 7, 8])
        np.testing.assert_array_equal(buf, 0)

    def test_errors_carry_code_and_message(self):
        with self.assertRaises(ferrocomm.Error) as e:
            self.comm.send(np.zeros(3, dtype=np.float32), 5)
        self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_ARGUMENT)
        self.assertIn("5 is out of range", str(e.exception))
        big = np.arange(8, dtype=np.float32)
        self.comm.send(big, 0, tag=3)
        with self.assertRaises(ferrocomm.Error) as e:
            self.comm.recv(np.zeros(4, dtype=np.float32), 0, 3)
        self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_ARGUMENT)
        # Python-side checks for what C cannot see.
        with self.assertRaises(TypeError):
            self.comm.send(np.zeros(2, dtype=np.complex64), 0)
        with self.assertRaises(ValueError):
            self.comm.send(np.zeros((4, 4))[:, 1], 0)
        ro = np.zeros(2)
        ro.setflags(write=False)
        with self.assertRaises(ValueError):
            self.comm.recv(ro, 0)
        # The C library itself refuses an unknown data type and a NULL handle.
        lib = ferrocomm._lib
        x = np.zeros(1)
        self.assertEqual(lib.ferrocomm_send(self.comm.handle, x.ctypes.data, 1, 99, 0, 0),
                         ferrocomm.ERR_INVALID_ARGUMENT)
        self.assertIn("99 (0x63) is not a ferrocomm_dtype", ferrocomm.last_error())
        self.assertEqual(lib.ferrocomm_barrier(None), ferrocomm.ERR_INVALID_HANDLE)

    def test_double_close_and_stale_handles(self):
        d = self.comm.dup()
        h = d.handle
        d.close()
        d.close()  # a no-op on the Python side
        lib = ferrocomm._lib
        self.assertEqual(lib.ferrocomm_comm_free(h), ferrocomm.ERR_INVALID_HANDLE)
        self.assertIn("already freed", ferrocomm.last_error())
        v = ctypes.c_size_t(0)
        self.assertEqual(lib.ferrocomm_comm_rank(h, ctypes.byref(v)), ferrocomm.ERR_INVALID_HANDLE)


class Collectives(unittest.TestCase):
    """One rank: every collective's result is its own input, which checks the plumbing
    (pointers, counts, types, in place, requests); 3 ranks run in ffi/examples."""

    @classmethod
    def setUpClass(cls):
        cls.dir = tempfile.TemporaryDirectory()
        cls.comm = ferrocomm.Communicator.init(f"file://{cls.dir.name}/store", 1, 0)

    @classmethod
    def tearDownClass(cls):
        cls.comm.close()
        cls.dir.cleanup()

    def test_collectives_of_one_rank(self):
        c = self.comm
        x = np.arange(12, dtype=np.float32)
        np.testing.assert_array_equal(c.all_reduce(x.copy(), "avg"), x)
        np.testing.assert_array_equal(c.all_reduce(x, ferrocomm.MAX, out=np.empty_like(x)), x)
        np.testing.assert_array_equal(c.broadcast(x.copy(), 0), x)
        np.testing.assert_array_equal(c.reduce(x.copy(), "sum", 0), x)
        np.testing.assert_array_equal(c.all_gather(x), x)
        np.testing.assert_array_equal(c.reduce_scatter(x), x)
        np.testing.assert_array_equal(c.gather(x, 0), x)
        np.testing.assert_array_equal(c.scatter(x, np.empty_like(x), 0), x)
        np.testing.assert_array_equal(c.all_to_all(x), x)
        y = x.copy()
        r = c.iall_reduce(y, "sum")
        self.assertEqual(r.wait().bytes, x.nbytes)
        np.testing.assert_array_equal(y, x)
        out = np.zeros_like(x)
        reqs = [c.iall_gather(x, out), c.ibroadcast(y, 0), c.ibarrier()]
        ferrocomm.waitall(reqs)
        np.testing.assert_array_equal(out, x)
        a, b = np.ones(5, dtype=np.float64), np.full(3, 2.0)
        c.all_reduce_many([a, b], "sum", bucket_bytes=16)
        np.testing.assert_array_equal(a, 1.0)
        np.testing.assert_array_equal(b, 2.0)
        sub = c.split(0, key=5)
        self.assertEqual((sub.rank, sub.size), (0, 1))
        sub.close()
        self.assertIsNone(c.split(None))
        g = c.create_group([0])
        self.assertEqual(g.size, 1)
        g.close()

    def test_collective_errors(self):
        c = self.comm
        with self.assertRaises(ferrocomm.Error) as e:
            c.all_reduce(np.arange(4, dtype=np.int32), "avg")
        self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_ARGUMENT)
        self.assertIn("avg is defined for floating-point", e.exception.message)
        with self.assertRaises(ferrocomm.Error) as e:
            c.broadcast(np.zeros(3), root=1)
        self.assertIn("root", e.exception.message)
        with self.assertRaises(ferrocomm.Error) as e:
            c.all_reduce(np.zeros(3), op=9)
        self.assertIn("9 (0x9) is not a ferrocomm_op", e.exception.message)
        with self.assertRaises(ferrocomm.Error) as e:
            c.all_reduce(np.zeros(3), op=ferrocomm.F64)
        self.assertIn("swapped", e.exception.message)
        with self.assertRaises(ValueError):
            c.all_reduce(np.zeros(3), op="mean")
        with self.assertRaises(TypeError):
            c.all_reduce(np.zeros(3), out=np.zeros(3, dtype=np.float32))

    def test_every_output_array_is_checked_before_the_call(self):
        """Each array a call writes is checked (length, element type, contiguity,
        alignment, writability) before the library sees it: an output array shorter than
        the call's result used to be written past its end."""
        c = self.comm
        x = np.arange(6, dtype=np.float32)

        def unaligned(n):
            return np.frombuffer(bytearray(4 * n + 1), dtype=np.float32, offset=1, count=n)

        def readonly(n):
            a = np.zeros(n, dtype=np.float32)
            a.flags.writeable = False
            return a

        # (name, call taking the output array, the right length of the output)
        calls = [
            ("all_reduce", lambda o: c.all_reduce(x, out=o), 6),
            ("iall_reduce", lambda o: c.iall_reduce(x, out=o).wait(), 6),
            ("reduce", lambda o: c.reduce(x, "sum", 0, out=o), 6),
            ("all_gather", lambda o: c.all_gather(x, out=o), 6),
            ("iall_gather", lambda o: c.iall_gather(x, o).wait(), 6),
            ("gather", lambda o: c.gather(x, 0, out=o), 6),
            ("scatter", lambda o: c.scatter(x, o, 0), 6),
            ("reduce_scatter", lambda o: c.reduce_scatter(x, out=o), 6),
            ("all_to_all", lambda o: c.all_to_all(x, out=o), 6),
            ("recv", lambda o: c.sendrecv(x, 0, o, 0, sendtag=3, recvtag=3), 6),
            ("broadcast", lambda o: c.broadcast(o, 0), 6),
        ]
        for name, call, n in calls:
            with self.subTest(name):
                good = np.zeros(n, dtype=np.float32)
                call(good)
                bad = {
                    "too short": (np.zeros(n + 8, dtype=np.float32)[: n - 1], ValueError),
                    "too long": (np.zeros(n + 1, dtype=np.float32), ValueError),
                    "of another type": (np.zeros(n, dtype=np.float64), TypeError),
                    "not contiguous": (np.zeros(2 * n, dtype=np.float32)[::2], ValueError),
                    "unaligned": (unaligned(n), ValueError),
                    "read-only": (readonly(n), ValueError),
                }
                if name in ("recv", "broadcast"):
                    # Point-to-point receives may be longer than the message; broadcast's
                    # one array sets the count itself.
                    del bad["too long"]
                    if name == "broadcast":
                        del bad["too short"], bad["of another type"]
                for what, (arr, exc) in bad.items():
                    with self.subTest(name=name, what=what):
                        if name == "recv" and what == "too short":
                            # The library refuses the longer message (nothing is written).
                            with self.assertRaises(ferrocomm.Error):
                                call(arr)
                            continue
                        with self.assertRaises(exc):
                            call(arr)
        # Inputs are checked too: scatter's array at the root must hold size * len(out).
        with self.assertRaises(ValueError):
            c.scatter(np.zeros(5, dtype=np.float32), np.zeros(6, dtype=np.float32), 0)
        with self.assertRaises(ValueError):
            c.send(np.zeros(8, dtype=np.float32)[::2], 0)
        # The communicator still works: every refusal happened before the library ran.
        np.testing.assert_array_equal(c.all_gather(x), x)


class Ddp(unittest.TestCase):
    def test_reducer_and_broadcast_parameters(self):
        with tempfile.TemporaryDirectory() as d:
            comm = ferrocomm.Communicator.init(f"file://{d}/store", world_size=1, rank=0)
            w = np.arange(6, dtype=np.float32).reshape(2, 3)
            b = np.ones(2, dtype=np.float16)
            comm.broadcast_parameters([w, b])  # one rank: unchanged
            self.assertEqual(w[1, 2], 5.0)
            r = ferrocomm.Reducer(comm, [("fc.weight", w), ("fc.bias", b)], bucket_cap_mb=0.001)
            self.assertEqual(r.index("fc.bias"), 1)
            with r.no_sync():
                r.mark_ready("fc.bias", b)
                r.mark_ready(0, w)
                r.finish()
            r.mark_ready(1, b)
            with self.assertRaises(ferrocomm.Error) as e:
                r.mark_ready("fc.bias", b)
            self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_ARGUMENT)
            self.assertIn('"fc.bias" (#1) was already marked', str(e.exception))
            with self.assertRaises(ferrocomm.Error) as e:
                r.finish()
            self.assertIn('"fc.weight"', str(e.exception))
            r.mark_ready(0, w)
            r.finish()
            g = r.grad("fc.weight")
            self.assertEqual(g.shape, (2, 3))
            np.testing.assert_array_equal(g, 2 * w)  # two accumulated steps, one rank
            np.testing.assert_array_equal(r.grad(1), 2 * b)
            r.close()
            r.close()  # twice is fine on the Python side
            with self.assertRaises(ferrocomm.Error) as e:
                ferrocomm.Reducer(comm, [("x", np.zeros(2))])  # float64
            self.assertIn("not a gradient type", str(e.exception))
            comm.close()


class Sampler(unittest.TestCase):
    def test_shards(self):
        shards = [ferrocomm.sampler_indices(10, 4, r, shuffle=False) for r in range(4)]
        self.assertEqual([s.tolist() for s in shards], [[0, 4, 8], [1, 5, 9], [2, 6, 0], [3, 7, 1]])
        parts = [ferrocomm.sampler_indices(1000, 3, r, seed=5, epoch=2, drop_last=True)
                 for r in range(3)]
        allidx = np.concatenate(parts)
        self.assertEqual(len(np.unique(allidx)), 999)
        self.assertFalse(np.array_equal(parts[0], ferrocomm.sampler_indices(1000, 3, 0, seed=5, epoch=3, drop_last=True)))
        with self.assertRaises(ferrocomm.Error) as e:
            ferrocomm.sampler_indices(10, 2, 2)
        self.assertEqual(e.exception.code, ferrocomm.ERR_INVALID_ARGUMENT)


if __name__ == "__main__":
    unittest.main(verbosity=2)
