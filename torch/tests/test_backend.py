"""Multi-process tests of the ferrocomm torch.distributed backend.

Each test starts N processes running worker.py (one scenario, compared with a reference and
with gloo) by hand with tcp://, env:// or file://, or under torchrun, and checks that all
exit 0 within a generous bound (a hang fails, it is never timed).
"""

import os
import socket
import subprocess
import sys
import tempfile

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "worker.py")
LIMIT = 300  # seconds: only a hang reaches it


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(extra=None):
    e = dict(os.environ)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.setdefault("FERROCOMM_LOG", "error")
    e["PYTHONWARNINGS"] = "ignore"
    e.update(extra or {})
    return e


def run_ranks(scenario, size, url=None, extra_env=None, per_rank_env=None):
    procs = []
    for r in range(size):
        e = env(extra_env)
        if per_rank_env:
            e.update(per_rank_env(r))
        args = [sys.executable, WORKER, scenario, str(r), str(size)]
        if url:
            args.append(url)
        procs.append(subprocess.Popen(args, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=LIMIT)
            outs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {scenario} exited {p.returncode}:\n{out[-4000:]}"
    return outs


def tcp_url():
    return f"tcp://127.0.0.1:{free_port()}"


@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_every_op_and_dtype_matches_reference_and_gloo(size):
    outs = run_ranks("ops", size, tcp_url())
    assert all("passed" in o for o in outs)


def test_ops_over_tcp_transport():
    run_ranks("ops", 2, tcp_url(), extra_env={"FERROCOMM_TRANSPORT": "tcp"})


@pytest.mark.parametrize("size", [2, 3])
def test_ddp_trains_to_the_same_parameters_as_gloo(size):
    outs = run_ranks("ddp", size, tcp_url())
    assert all("DDP matches gloo" in o for o in outs)


def test_a_dead_rank_gives_an_exception_naming_it():
    outs = run_ranks("dead", 3, tcp_url(), extra_env={"FERROCOMM_OP_TIMEOUT": "60"})
    for o in outs[:2]:
        assert "lost peer rank 2" in o or "rank 2" in o, o


def test_env_init_by_hand():
    port = free_port()
    run_ranks(
        "ops",
        2,
        url="env://",
        extra_env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
    )


def test_file_init():
    with tempfile.TemporaryDirectory() as d:
        run_ranks("ops", 2, url=f"file://{d}/store")


def test_torchrun():
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    port = free_port()
    p = subprocess.run(
        [torchrun, "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(port), WORKER, "ddp"],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=LIMIT,
    )
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-4000:]
    assert out.count("DDP matches gloo") == 2, out[-4000:]


def test_a_tensor_on_another_device_is_refused():
    from ferrocomm_torch.backend import _Buf
    import torch.distributed as dist

    with pytest.raises(dist.DistBackendError, match="CPU tensors only"):
        _Buf(torch.empty(2, device="meta"), "all_reduce", 0)


def test_unsupported_dtype_is_refused_with_its_name():
    from ferrocomm_torch.backend import _Buf
    import torch.distributed as dist

    with pytest.raises(dist.DistBackendError, match="float8"):
        _Buf(torch.empty(2, dtype=torch.float8_e4m3fn), "all_reduce", 0)


def test_mismatched_collectives_give_every_rank_an_error():
    outs = run_ranks("mismatch", 3, tcp_url())
    assert all("collective mismatch" in o for o in outs), outs


def test_mismatched_bitwise_ops_give_every_rank_an_error():
    outs = run_ranks("bitwise_mismatch", 3, tcp_url())
    assert all("collective mismatch" in o and "BOR" in o and "BAND" in o for o in outs), outs


def test_a_rank_that_never_calls_gives_a_timeout_naming_the_operation():
    outs = run_ranks("timeout", 3, tcp_url(), extra_env={"FERROCOMM_OP_TIMEOUT": "3"})
    for o in outs[:2]:
        assert "timed out" in o and "rank 2" in o, o


EXAMPLES = os.path.join(HERE, "..", "..", "examples", "torch")


@pytest.mark.parametrize("nproc", [1, 3])
@pytest.mark.parametrize("example", ["launcher", "ddp_linear", "sampler", "checkpoint"])
def test_walkthrough_example_under_torchrun(example, nproc, tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    args = [torchrun, "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), os.path.join(EXAMPLES, f"{example}.py")]
    if example == "checkpoint":
        args.append(str(tmp_path / "ckpt.pt"))
    p = subprocess.run(args, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=LIMIT)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-4000:]


def test_walkthrough_launcher_by_hand_with_env():
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.join(EXAMPLES, "launcher.py")],
            env=env({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                     "RANK": str(r)}),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        for r in range(2)
    ]
    for r, p in enumerate(procs):
        out, _ = p.communicate(timeout=LIMIT)
        assert p.returncode == 0, out.decode(errors="replace")[-4000:]
        assert f"rank {r} of 2" in out.decode()


def test_work_wait_honours_its_timeout():
    outs = run_ranks("wait_timeout", 3, tcp_url(), extra_env={"FERROCOMM_OP_TIMEOUT": "600"})
    for o in outs[:2]:
        assert "wait(timeout) raised" in o, o


FERRORUN = os.path.join(HERE, "..", "..", "target", "release", "ferrorun")


def ferrorun(nproc, args):
    assert os.path.exists(FERRORUN), (
        f"{FERRORUN} is missing: cargo build --release --bins (cargo test builds it)"
    )
    return subprocess.run(
        [FERRORUN, "--nproc-per-node", str(nproc), "--", sys.executable] + args,
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=LIMIT,
    )


def test_ferrorun_launches_ddp_that_matches_gloo():
    # env:// under ferrorun: torch's TCPStore client joins ferrorun's store (which speaks
    # TCPStore's protocol), the backend rendezvouses through it.
    p = ferrorun(2, [WORKER, "ddp"])
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-4000:]
    assert out.count("DDP matches gloo") == 2, out[-4000:]


@pytest.mark.parametrize("nproc", [2, 4])
@pytest.mark.parametrize("example", ["launcher", "ddp_linear", "sampler", "checkpoint"])
def test_walkthrough_example_under_ferrorun(example, nproc, tmp_path):
    args = [os.path.join(EXAMPLES, f"{example}.py")]
    if example == "checkpoint":
        args.append(str(tmp_path / "ckpt.pt"))
    p = ferrorun(nproc, args)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-4000:]
    if example == "launcher":
        for r in range(nproc):
            assert f"rank {r} of {nproc}" in out, out[-4000:]


def test_fsdp2_trains_to_the_same_parameters_as_gloo():
    # fully_shard on CPU: all_gather_into_tensor and reduce_scatter_tensor with uneven
    # shards (a 33-row layer on 2 ranks); Adam's steps match gloo's, replicas identical.
    outs = run_ranks("fsdp2", 2, tcp_url())
    assert all("FSDP2 matches gloo" in o for o in outs)


def test_split_group_subgroups_sequence_numbers_and_monitored_barrier():
    # split_group ([[0, 2], [1]], and one leaving rank 2 out), new_subgroups, the group's
    # sequence numbers, monitored_barrier passing and naming the rank that does not come.
    outs = run_ranks("groups", 3, tcp_url())
    assert "rank 2 did not reach the barrier" in outs[0], outs[0]
    assert "rank 0 reports" in outs[1], outs[1]


def test_monitored_barrier_with_wait_all_ranks_names_every_absent_rank():
    outs = run_ranks("monitored_all", 4, tcp_url())
    assert "ranks 2, 3 did not reach the barrier" in outs[0], outs[0]
    assert "rank 0 reports" in outs[1], outs[1]


def test_new_group_and_split_group_of_a_group_bound_to_a_device():
    # init_process_group(device_id=cpu:0): new_group splits the parent and asks the ranks
    # outside it for a no-color split.
    outs = run_ranks("bound_split", 3, tcp_url())
    assert all("bound split passed" in o for o in outs), outs
