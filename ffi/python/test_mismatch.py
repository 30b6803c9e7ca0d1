"""Collective argument agreement through the C ABI, from Python: ranks that disagree about a
broadcast's or a reduce's root, or about an all_reduce's count, all fail with
COLLECTIVE_MISMATCH (never success with the wrong data, never a timeout), and the message
names two ranks whose calls differ and both calls.

    cargo build --release -p ferrocomm-ffi && cargo build --release -p ferrocomm --bin ferrorun
    FERROCOMM_LIB=target/release/libferrocomm.so python3 ffi/python/test_mismatch.py

Run directly, it starts itself as 3 (then 4) ranks under ferrorun for each case, once over
TCP and once over shared memory, and checks every rank's report; each job is bounded.
"""

import os
import re
import subprocess
import sys
import unittest

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import ferrocomm  # noqa: E402

CASE_VAR = "FERROCOMM_PY_MISMATCH_CASE"
CASES = ["broadcast_root", "reduce_root", "all_reduce_count", "ibroadcast_root"]
PAIR = re.compile(r"call #\d+: rank (\d+) called (\w+\([^)]*\)) but rank (\d+) called (\w+\([^)]*\))")


def rank_main(case):
    """One rank: makes its (disagreeing) call and prints the outcome; always exits 0."""
    comm = ferrocomm.Communicator.init()
    r, p = comm.rank, comm.size
    try:
        if case == "broadcast_root":
            comm.broadcast(np.full(4, r, dtype=np.float32), root=0 if r == 0 else 1)
        elif case == "reduce_root":
            comm.reduce(np.ones(4, dtype=np.int32), root=1 if r == p - 1 else 0)
        elif case == "all_reduce_count":
            comm.all_reduce(np.ones(8 + (r == 1), dtype=np.float64))
        elif case == "ibroadcast_root":
            comm.ibroadcast(np.zeros(3, dtype=np.uint8), root=r % 2).wait()
        print(f"PYMM rank={r} ok", flush=True)
    except ferrocomm.Error as e:
        print(f"PYMM rank={r} code={e.code} {e.message}", flush=True)
    os._exit(0)


def ferrorun():
    for path in (os.environ.get("FERROCOMM_FERRORUN"),
                 os.path.join(HERE, "..", "..", "target", "release", "ferrorun"),
                 os.path.join(HERE, "..", "..", "target", "debug", "ferrorun")):
        if path and os.path.exists(path):
            return path
    raise unittest.SkipTest("no ferrorun built")


class Disagreements(unittest.TestCase):
    def run_case(self, case, n, transport):
        env = dict(os.environ, **{CASE_VAR: case, "FERROCOMM_TRANSPORT": transport,
                                   "FERROCOMM_OP_TIMEOUT": "1800"})
        out = subprocess.run(
            [ferrorun(), "--nproc-per-node", str(n), "--", sys.executable, os.path.abspath(__file__)],
            env=env, capture_output=True, text=True, timeout=60)
        # Ranks' lines may reach ferrorun's stdout glued together: split on the marker.
        lines = [part.strip() for part in out.stdout.split("PYMM ")[1:]]
        self.assertEqual(len(lines), n, f"{case}: {out.stdout}\n{out.stderr}")
        for line in lines:
            self.assertIn(f"code={ferrocomm.ERR_COLLECTIVE_MISMATCH} ", line, f"{case}: {line}")
            m = PAIR.search(line)
            self.assertIsNotNone(m, f"{case}: no pair named: {line}")
            a, ca, b, cb = m.groups()
            self.assertNotEqual(a, b, line)
            self.assertNotEqual(ca, cb, line)

    def test_every_rank_gets_the_mismatch(self):
        for transport in ("tcp", "shm"):
            for case in CASES:
                for n in (3, 4):
                    with self.subTest(case=case, n=n, transport=transport):
                        self.run_case(case, n, transport)


if __name__ == "__main__":
    if os.environ.get(CASE_VAR) and os.environ.get("RANK") is not None:
        rank_main(os.environ[CASE_VAR])
    unittest.main()
