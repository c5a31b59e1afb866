"""Two nodes on one machine (docs/cluster.md's recipe, gloo on 127.0.0.1): a 2-node x 1-process training run equals
a 1-node x 2-process run bit for bit, a run killed on one node resumes exactly, and sample_ddp.py across two
nodes writes the same .npz as one process."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from checkpoints import load_checkpoint
from tests.test_sample_ddp import SAMPLE_ARGS, tiny_pixel_checkpoint
from tests.test_train import tiny_argv

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(script_args, port=None):
    """The two launches of the recipe, as two nodes would run them (node ranks 0 and 1, static rendezvous)."""
    port = port or free_port()
    return [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(node),
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                str(port),
                *script_args,
            ],
            cwd=ROOT,
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )  # fmt: skip
        for node in (0, 1)
    ]


def wait(procs, timeout=300):
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-3000:]


def weights(path: Path) -> dict:
    ckpt = load_checkpoint(path)
    return {f"{k}.{n}": t for k in ("model", "ema") for n, t in ckpt[k].items()}


def test_two_nodes_train_like_one_node_and_resume_after_a_node_dies(demo_data, tmp_path):
    argv = [str(ROOT / "train.py"), *tiny_argv(demo_data, tmp_path / "nodes", max_train_steps=6, checkpointing_steps=2)]
    one_node = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "train.py")]
    one_node += tiny_argv(demo_data, tmp_path / "one", max_train_steps=6, checkpointing_steps=2)
    subprocess.run(one_node, cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    wait(two_nodes(argv))
    reference = weights(tmp_path / "one" / "run" / "checkpoints" / "0000006.pt")
    final = weights(tmp_path / "nodes" / "run" / "checkpoints" / "0000006.pt")
    assert all(torch.equal(reference[k], final[k]) for k in reference), "2 nodes x 1 differs from 1 node x 2"

    # Kill node 1 mid-run (after the step-2 checkpoint); node 0 then blocks in a collective until the job is
    # killed (a scheduler does that on a cluster). The same two launches then resume from the last checkpoint.
    run = tmp_path / "killed"
    argv = [str(ROOT / "train.py"), *tiny_argv(demo_data, run, max_train_steps=6, checkpointing_steps=2)]
    procs = two_nodes(argv)
    deadline = time.time() + 240
    while not (run / "run" / "checkpoints" / "0000002.pt").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), "no checkpoint before the kill"
        time.sleep(0.2)
    for proc in (procs[1], procs[0]):
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    wait(two_nodes(argv))
    resumed = weights(run / "run" / "checkpoints" / "0000006.pt")
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), "the resumed 2-node run differs"


def test_two_nodes_sample_the_same_npz_as_one_process(tmp_path):
    ckpt = tmp_path / "ckpt.pt"
    tiny_pixel_checkpoint(ckpt)
    common = ["--ckpt", str(ckpt), *SAMPLE_ARGS, "--mode", "sde"]
    subprocess.run([sys.executable, str(ROOT / "sample_ddp.py"), *common, "--sample-dir", str(tmp_path / "one")],
                   cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)  # fmt: skip
    wait(two_nodes([str(ROOT / "sample_ddp.py"), *common, "--sample-dir", str(tmp_path / "two")]))
    one, two = np.load(tmp_path / "one.npz"), np.load(tmp_path / "two.npz")
    assert np.array_equal(one["arr_0"], two["arr_0"]) and np.array_equal(one["arr_1"], two["arr_1"])
