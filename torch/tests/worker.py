"""One rank of a multi-process test: `python worker.py SCENARIO RANK SIZE INIT_URL`.

Exits 0 when every check passed; prints what failed otherwise. Each scenario compares
ferrocomm with a reference computed here and with gloo (a second process group).
"""

import datetime
import os
import sys
import time

import torch
import torch.distributed as dist

import ferrocomm_torch  # noqa: F401  (registers "ferrocomm")

DTYPES = [
    torch.bool,
    torch.uint8,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
]
SIZES = [0, 1, 7, 1000]
R = dist.ReduceOp


def data(rank, dtype, n, salt=0):
    g = torch.Generator().manual_seed(1000 * rank + 17 * n + salt)
    if dtype == torch.bool:
        return torch.randint(0, 2, (n,), generator=g).bool()
    if dtype.is_floating_point:
        return (torch.randn(n, generator=g, dtype=torch.float64) * 4).to(dtype)
    lo = 0 if dtype == torch.uint8 else -4
    return torch.randint(lo, 5, (n,), generator=g).to(dtype)


def reference(op, xs):
    dt = xs[0].dtype
    if dt == torch.bool:
        st = torch.stack([x.to(torch.uint8) for x in xs])
        fn = {R.SUM: st.amax, R.MAX: st.amax, R.BOR: st.amax, R.PRODUCT: st.amin,
              R.MIN: st.amin, R.BAND: st.amin}.get(op)
        if fn is not None:
            return fn(0).bool()
        return torch.stack(xs).to(torch.uint8).sum(0).remainder(2).bool()  # BXOR
    wide = torch.float64 if dt.is_floating_point else torch.int64
    st = torch.stack([x.to(wide) for x in xs])
    if op == R.SUM:
        out = st.sum(0)
    elif op == R.PRODUCT:
        out = st.prod(0)
    elif op == R.MIN:
        out = st.amin(0)
    elif op == R.MAX:
        out = st.amax(0)
    elif op == R.AVG:
        out = st.mean(0)
    else:
        import functools
        fn = {R.BAND: torch.bitwise_and, R.BOR: torch.bitwise_or, R.BXOR: torch.bitwise_xor}[op]
        out = functools.reduce(fn, list(st.unbind(0)))
    return out.to(dt)  # integers wrap like the backends do


def close(a, b, what):
    if a.dtype.is_floating_point:
        tol = {torch.float16: 2e-2, torch.bfloat16: 5e-2}.get(a.dtype, 1e-5)
        ok = torch.allclose(a.double(), b.double(), rtol=tol, atol=tol * 8)
    else:
        ok = torch.equal(a, b)
    if not ok:
        raise AssertionError(f"{what}: got {a[:8]} expected {b[:8]}")


def ops_for(dtype):
    if dtype == torch.bool:
        return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR]
    if dtype.is_floating_point:
        return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.AVG]
    return [R.SUM, R.PRODUCT, R.MIN, R.MAX, R.BAND, R.BOR, R.BXOR]


def with_gloo(gloo, fn):
    """Runs fn on the gloo group; None when gloo does not support the case."""
    try:
        return fn(gloo)
    except (RuntimeError, ValueError, TypeError):
        return None


def scenario_ops(rank, size):
    gloo = dist.new_group(backend="gloo")
    checked = 0
    for dtype in DTYPES:
        for n in SIZES:
            xs = [data(r, dtype, n) for r in range(size)]
            for op in ops_for(dtype):
                what = f"all_reduce {op} {dtype} n={n}"
                x = xs[rank].clone()
                dist.all_reduce(x, op=op)
                ref = reference(op, xs)
                close(x, ref, what)
                # gloo agrees (when it handles the case; integers exactly).
                if op != R.AVG:
                    def g(grp, op=op):
                        y = xs[rank].clone()
                        dist.all_reduce(y, op=op, group=grp)
                        return y
                    y = with_gloo(gloo, g)
                    if y is not None:
                        close(x, y, what + " vs gloo")
                checked += 1
            # broadcast from the last rank
            x = xs[rank].clone()
            dist.broadcast(x, size - 1)
            close(x, xs[size - 1], f"broadcast {dtype} n={n}")
            # all_gather, list and tensor forms
            outs = [torch.empty(n, dtype=dtype) for _ in range(size)]
            dist.all_gather(outs, xs[rank])
            for r in range(size):
                close(outs[r], xs[r], f"all_gather {dtype} n={n} from {r}")
            flat = torch.empty(n * size, dtype=dtype)
            dist.all_gather_into_tensor(flat, xs[rank])
            close(flat, torch.cat(xs), f"all_gather_into_tensor {dtype} n={n}")
            # reduce to rank 0
            if dtype != torch.bool:
                x = xs[rank].clone()
                dist.reduce(x, 0, op=R.SUM)
                if rank == 0:
                    close(x, reference(R.SUM, xs), f"reduce {dtype} n={n}")
            # gather / scatter at the last rank
            root = size - 1
            gl = [torch.empty(n, dtype=dtype) for _ in range(size)] if rank == root else None
            dist.gather(xs[rank], gl, dst=root)
            if rank == root:
                for r in range(size):
                    close(gl[r], xs[r], f"gather {dtype} n={n} from {r}")
            out = torch.empty(n, dtype=dtype)
            dist.scatter(out, [x for x in xs] if rank == root else None, src=root)
            close(out, xs[rank], f"scatter {dtype} n={n}")
            # reduce_scatter (tensor and list forms) of size * n elements
            if dtype != torch.bool:
                ins = [data(r, dtype, n * size, salt=1) for r in range(size)]
                out = torch.empty(n, dtype=dtype)
                dist.reduce_scatter_tensor(out, ins[rank].clone())
                ref = reference(R.SUM, ins)[rank * n:(rank + 1) * n]
                close(out, ref, f"reduce_scatter_tensor {dtype} n={n}")
                out2 = torch.empty(n, dtype=dtype)
                dist.reduce_scatter(out2, list(ins[rank].clone().split(n)) if n else
                                    [torch.empty(0, dtype=dtype)] * size)
                close(out2, ref, f"reduce_scatter {dtype} n={n}")
            # all_to_all_single, even
            ins = [data(r, dtype, n * size, salt=2) for r in range(size)]
            out = torch.empty(n * size, dtype=dtype)
            dist.all_to_all_single(out, ins[rank].clone())
            ref = torch.cat([ins[r][rank * n:(rank + 1) * n] for r in range(size)])
            close(out, ref, f"all_to_all_single {dtype} n={n}")
    # all_to_all_single with split sizes: rank r sends (r + d + 1) elements to rank d.
    for dtype in (torch.float32, torch.int64):
        def splits(src):
            return [src + d + 1 for d in range(size)]
        ins = [data(r, dtype, sum(splits(r)), salt=3) for r in range(size)]
        in_split = splits(rank)
        out_split = [r + rank + 1 for r in range(size)]
        out = torch.empty(sum(out_split), dtype=dtype)
        dist.all_to_all_single(out, ins[rank].clone(), out_split, in_split)
        pieces = []
        for r in range(size):
            off = sum(splits(r)[:rank])
            pieces.append(ins[r][off:off + rank + r + 1])
        close(out, torch.cat(pieces), f"all_to_all_single splits {dtype}")
        # all_to_all (lists) with the same shapes
        outs = [torch.empty(s, dtype=dtype) for s in out_split]
        dist.all_to_all(outs, list(ins[rank].clone().split(in_split)))
        close(torch.cat(outs), torch.cat(pieces), f"all_to_all {dtype}")
    # non-contiguous tensors
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6) + rank
    nc = base.t()
    assert not nc.is_contiguous()
    dist.all_reduce(nc)
    expect = sum(torch.arange(24, dtype=torch.float32).reshape(4, 6) + r for r in range(size))
    close(base, expect, "all_reduce non-contiguous")
    # complex numbers as pairs of reals
    z = torch.complex(torch.ones(3) * rank, torch.ones(3))
    dist.all_reduce(z)
    close(torch.view_as_real(z), torch.view_as_real(torch.complex(
        torch.ones(3) * sum(range(size)), torch.ones(3) * size)), "all_reduce complex")
    # PREMUL_SUM: every input scaled by the factor, then summed
    t = torch.full((3,), float(rank + 1), dtype=torch.float64)
    dist.all_reduce(t, op=dist._make_nccl_premul_sum(0.5))
    close(t, torch.full((3,), 0.5 * sum(range(1, size + 1)), dtype=torch.float64), "premul_sum")
    # allreduce_coalesced
    ts = [torch.full((3,), float(rank)), torch.full((5,), 2.0 * rank)]
    dist.all_reduce_coalesced(ts)
    close(ts[0], torch.full((3,), float(sum(range(size)))), "coalesced 0")
    close(ts[1], torch.full((5,), 2.0 * sum(range(size))), "coalesced 1")
    # async works complete with their tensors
    t = torch.ones(4)
    w = dist.all_reduce(t, async_op=True)
    w.wait()
    fut = w.get_future().value()
    close(fut[0], torch.full((4,), float(size)), "future value")
    # a burst of async operations, then a synchronous one: all complete, in order
    ts = [torch.full((1000,), float(rank * i)) for i in range(8)]
    works = [dist.all_reduce(t, async_op=True) for t in ts]
    b = torch.full((3,), float(rank))
    dist.broadcast(b, 0)
    for i, (w, t) in enumerate(zip(works, ts)):
        w.wait()
        close(t, torch.full((1000,), float(i * sum(range(size)))), f"async all_reduce #{i}")
    close(b, torch.zeros(3), "broadcast after async all_reduces")
    # send / recv in a ring (non-blocking, so no order deadlock)
    if size > 1:
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        s = torch.full((5,), float(rank))
        r = torch.empty(5)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, s, nxt), dist.P2POp(dist.irecv, r, prv)])
        for q in reqs:
            q.wait()
        close(r, torch.full((5,), float(prv)), "batch_isend_irecv ring")
        if rank == 0:
            dist.send(torch.tensor([42.0, 43.0]), 1, tag=7)
        elif rank == 1:
            got = torch.empty(2)
            dist.recv(got, 0, tag=7)
            close(got, torch.tensor([42.0, 43.0]), "send/recv")
    dist.barrier()
    # a sub-group of the even ranks
    evens = list(range(0, size, 2))
    sub = dist.new_group(evens, backend="ferrocomm")
    if rank in evens:
        t = torch.ones(2)
        dist.all_reduce(t, group=sub)
        close(t, torch.full((2,), float(len(evens))), "new_group all_reduce")
    print(f"rank {rank}: {checked} all_reduce cases and the other operations passed")


def scenario_ddp(rank, size):
    from torch.nn.parallel import DistributedDataParallel as DDP

    gloo = dist.new_group(backend="gloo")

    def train(group, **kw):
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
            torch.nn.Linear(64, 4),
        )
        # Different starting parameters per rank: DDP's broadcast must equalise them.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(rank * 0.01)
        ddp = DDP(model, process_group=group, bucket_cap_mb=0.01, **kw)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(rank)
        for step in range(6):
            x = torch.randn(8, 16, generator=g)
            y = torch.randn(8, 4, generator=g)
            opt.zero_grad()
            if step == 2:
                with ddp.no_sync():
                    torch.nn.functional.mse_loss(ddp(x), y).backward()
                x = torch.randn(8, 16, generator=g)
            loss = torch.nn.functional.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
        return torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    mine = train(None)
    theirs = train(gloo)
    close(mine, theirs, "DDP parameters ferrocomm vs gloo")
    # Replicas are identical.
    all_p = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(all_p, mine)
    for r in range(size):
        if not torch.equal(all_p[r], mine):
            raise AssertionError(f"replica of rank {r} differs from rank {rank}'s")
    # A communication hook (fp16 compression) runs over the backend's futures.
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    ddp = DDP(model)
    ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    ddp(torch.randn(4, 8)).sum().backward()
    print(f"rank {rank}: DDP matches gloo")


def scenario_dead(rank, size):
    # The last rank leaves; the others must get an error naming it, not hang.
    t = torch.ones(4)
    dist.all_reduce(t)
    if rank == size - 1:
        os._exit(0)
    time.sleep(0.5)
    start = time.time()
    try:
        for _ in range(3):
            # async: the error arrives through the Work (the worker thread's future)
            dist.all_reduce(torch.ones(1 << 16), async_op=True).wait()
    except Exception as e:
        msg = str(e)
        assert f"rank {size - 1}" in msg and "all_reduce" in msg, msg
        assert isinstance(e, dist.DistBackendError), type(e)
        print(f"rank {rank}: got the expected error after {time.time() - start:.1f}s: {msg[:200]}")
        os._exit(0)
    raise AssertionError("all_reduce with a dead rank succeeded")


def scenario_mismatch(rank, size):
    # Rank 0 calls all_reduce while the others broadcast: every rank gets an error.
    t = torch.ones(8)
    try:
        if rank == 0:
            dist.all_reduce(t)
        else:
            dist.broadcast(t, 0)
    except dist.DistBackendError as e:
        print(f"rank {rank}: mismatch reported: {str(e)[:300]}")
        os._exit(0)
    raise AssertionError(f"rank {rank}: mismatched collectives succeeded: {t}")


def scenario_bitwise_mismatch(rank, size):
    # Rank 0 asks for BAND, the others for BOR (both are an all_gather underneath): every
    # rank gets an error naming the operations, none a result.
    t = torch.tensor([rank + 1, 6], dtype=torch.int32)
    op = dist.ReduceOp.BAND if rank == 0 else dist.ReduceOp.BOR
    try:
        dist.all_reduce(t, op=op)
    except dist.DistBackendError as e:
        print(f"rank {rank}: mismatch reported: {str(e)[:300]}")
        os._exit(0)
    raise AssertionError(f"rank {rank}: mismatched bitwise ops succeeded: {t}")


def scenario_timeout(rank, size):
    # The last rank never joins the all_reduce (it waits, alive): the others time out
    # (FERROCOMM_OP_TIMEOUT, set small by the test) with an error naming the operation.
    if rank == size - 1:
        time.sleep(float(os.environ["FERROCOMM_OP_TIMEOUT"]) * 4)
        os._exit(0)
    try:
        dist.all_reduce(torch.ones(4))
    except dist.DistBackendError as e:
        msg = str(e)
        assert "all_reduce" in msg and "timed out" in msg, msg
        print(f"rank {rank}: timed out as expected: {msg[:300]}")
        os._exit(0)
    raise AssertionError("all_reduce without the last rank succeeded")


def scenario_wait_timeout(rank, size):
    # The last rank never joins; the others' Work.wait(timeout) raises after the timeout
    # (the operation's own timeout is far longer).
    if rank == size - 1:
        time.sleep(20)
        os._exit(0)
    w = dist.all_reduce(torch.ones(4), async_op=True)
    start = time.time()
    try:
        w.wait(datetime.timedelta(seconds=2))
    except dist.DistBackendError as e:
        # Its own timeout, or the abort of a rank whose timeout came first.
        assert "within the wait timeout" in str(e) or "aborted" in str(e), str(e)
        print(f"rank {rank}: wait(timeout) raised after {time.time() - start:.1f}s: {e}")
        os._exit(0)
    raise AssertionError("wait(timeout) returned although the operation cannot finish")


def scenario_fsdp2(rank, size):
    # FSDP2 (fully_shard on CPU): parameters sharded across ranks, all_gather_into_tensor
    # before each forward/backward, reduce_scatter_tensor of the gradients; the same
    # training with gloo must reach the same parameters, and every rank's full copy agrees.
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    def train(backend):
        torch.manual_seed(0)
        # Odd sizes: some parameters do not split evenly between the ranks.
        model = torch.nn.Sequential(
            torch.nn.Linear(13, 40), torch.nn.ReLU(), torch.nn.Linear(40, 33), torch.nn.ReLU(),
            torch.nn.Linear(33, 3),
        )
        group = dist.group.WORLD if backend is None else dist.new_group(backend=backend)
        mesh = DeviceMesh.from_group(group, "cpu")
        for layer in (model[0], model[2], model[4]):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(rank)
        for _ in range(5):
            x = torch.randn(6, 13, generator=g)
            y = torch.randn(6, 3, generator=g)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return torch.cat([p.full_tensor().detach().reshape(-1) for p in model.parameters()])

    mine = train(None)
    theirs = train("gloo")
    close(mine, theirs, "FSDP2 parameters ferrocomm vs gloo")
    all_p = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(all_p, mine)
    for r in range(size):
        if not torch.equal(all_p[r], mine):
            raise AssertionError(f"FSDP2: the full parameters of rank {r} differ from rank {rank}'s")
    print(f"rank {rank}: FSDP2 matches gloo")


def scenario_groups(rank, size):
    # split_group, new_subgroups, monitored_barrier and sequence numbers (size 3).
    # split_group: [[0, 2], [1]]; each sub-group's all_reduce and all_gather see its ranks only.
    sub = dist.split_group(split_ranks=[[0, 2], [1]])
    members = [0, 2] if rank in (0, 2) else [1]
    t = torch.full((5,), float(rank + 1))
    dist.all_reduce(t, group=sub)
    close(t, torch.full((5,), float(sum(r + 1 for r in members))), "split_group all_reduce")
    got = [torch.empty(1, dtype=torch.int64) for _ in members]
    dist.all_gather(got, torch.tensor([rank]), group=sub)
    if [int(x) for x in got] != members:
        raise AssertionError(f"split_group all_gather: got {got}, expected {members}")
    # A split that leaves rank 2 out: torch cannot take "not a member" back from a Python
    # backend, so rank 2 gets an error saying so; ranks 0 and 1 get their group.
    try:
        pair = dist.split_group(split_ranks=[[0, 1]])
    except dist.DistBackendError as e:
        if rank != 2 or "in none of the splits" not in str(e):
            raise
    else:
        if rank == 2:
            raise AssertionError(f"rank 2 got a group it is not in: {pair}")
        t = torch.tensor([10.0 * (rank + 1)])
        dist.all_reduce(t, group=pair)
        close(t, torch.tensor([30.0]), "split_group of ranks 0 and 1")
    # new_subgroups: one group per rank.
    own, _ = dist.new_subgroups(group_size=1)
    t = torch.tensor([rank + 0.5])
    dist.all_reduce(t, group=own)
    close(t, torch.tensor([rank + 0.5]), "new_subgroups all_reduce")

    # Sequence numbers: the group's counts the operations, the same on every rank (torch
    # hands the user its own C++ Work, which cannot ask a Python Work for its number).
    world = dist.group.WORLD
    n0 = world._get_sequence_number_for_group()
    dist.all_reduce(torch.ones(3), async_op=True).wait()
    dist.broadcast(torch.ones(3), 0)
    n = world._get_sequence_number_for_group()
    if n != n0 + 2:
        raise AssertionError(f"the group's sequence number went from {n0} to {n} in two calls")
    seqs = [torch.empty(1, dtype=torch.int64) for _ in range(size)]
    dist.all_gather(seqs, torch.tensor([n]))
    if len({int(x) for x in seqs}) != 1:
        raise AssertionError(f"ranks disagree on the sequence number: {seqs}")

    # monitored_barrier: passes when every rank comes (twice in a row) ...
    for _ in range(2):
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    # ... and names the rank that does not come.
    if rank == size - 1:
        time.sleep(8)  # alive past the others' 3 s timeout (leaving would be "lost peer")
        os._exit(0)
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=3), wait_all_ranks=True)
    except dist.DistBackendError as e:
        msg = str(e)
        if rank == 0:
            assert f"rank {size - 1} did not reach the barrier" in msg, msg
        else:
            assert "rank 0 reports" in msg, msg
        print(f"rank {rank}: groups passed; monitored_barrier reported: {msg[:200]}")
        os._exit(0)
    raise AssertionError("monitored_barrier passed without the last rank")


def scenario_monitored_all(rank, size):
    # monitored_barrier(wait_all_ranks=True) with the last two ranks absent: rank 0 names
    # both, the other rank that came hears it from rank 0.
    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    if rank >= size - 2:
        time.sleep(8)  # alive past the others' 3 s timeout (leaving would be "lost peer")
        os._exit(0)
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=3), wait_all_ranks=True)
    except dist.DistBackendError as e:
        msg = str(e)
        if rank == 0:
            expected = f"ranks {size - 2}, {size - 1} did not reach the barrier"
            assert expected in msg, msg
        else:
            assert "rank 0 reports" in msg, msg
        print(f"rank {rank}: monitored_barrier reported: {msg[:200]}")
        os._exit(0)
    raise AssertionError("monitored_barrier passed without the last two ranks")


def scenario_bound_split(rank, size):
    # A process group bound to a device (init_process_group(device_id=cpu:0)): new_group
    # splits the parent, ranks outside the new group are asked for a "no-color" split.
    pair = dist.new_group([0, 1])
    if rank < 2:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t, group=pair)
        close(t, torch.tensor([3.0]), "new_group of a bound group")
    elif pair is not dist.GroupMember.NON_GROUP_MEMBER:
        raise AssertionError(f"rank {rank} got a group it is not in: {pair}")
    sub = dist.split_group(split_ranks=[[0, 2], [1]])
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t, group=sub)
    close(t, torch.tensor([4.0 if rank != 1 else 2.0]), "split_group of a bound group")
    print(f"rank {rank}: bound split passed")


def main():
    scenario = sys.argv[1]
    if len(sys.argv) > 2:
        rank, size = int(sys.argv[2]), int(sys.argv[3])
    else:  # under torchrun
        rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    url = sys.argv[4] if len(sys.argv) > 4 else None
    bound = {"device_id": torch.device("cpu:0")} if scenario == "bound_split" else {}
    if url:
        dist.init_process_group(
            "ferrocomm", init_method=url, rank=rank, world_size=size,
            timeout=datetime.timedelta(seconds=60), **bound,
        )
    else:  # env:// (torchrun)
        dist.init_process_group("ferrocomm", timeout=datetime.timedelta(seconds=60))
    assert dist.get_rank() == rank and dist.get_world_size() == size
    globals()["scenario_" + scenario](rank, size)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
