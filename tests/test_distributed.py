"""Data-parallel training under torchrun with Gloo on the CPU."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import rect_overrides, write_rectangles_dataset

from o2f.checkpoint import load_checkpoint
from o2f.config import load_config
from o2f.model.detector import O2F

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, **kw)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def o2f_train(work_dir, overrides):
    args = ["-m", "o2f", "train", "--config", "digits", "--work-dir", str(work_dir)]
    for item in overrides:
        args += ["--set", item]
    return args


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    # one image size per orientation: every batch pads alike however it is split, so
    # GroupNorm sees the same pixels in one process and in two
    return write_rectangles_dataset(tmp_path_factory.mktemp("ddp"), num_train=16, num_val=4)


def test_two_processes_match_one_process_with_the_same_total_batch(data, tmp_path):
    # SGD: Adam would turn float noise in near-zero gradients (biases before GroupNorm)
    # into full-size steps, so two exact runs could differ by the learning rate
    # the preset's rescorer off: from scratch, 4 steps give it no detection of an object to
    # learn from, so its zero-initialised output weights could not move (checked below)
    overrides = rect_overrides(data, **{"train.max_iters": 4, "train.eval_every": 0,
                                        "model.norm_eval": True, "train.epochs": 1,
                                        "train.optimizer": "sgd", "train.lr": 0.02,
                                        "model.rescore": False})
    run([sys.executable, *o2f_train(tmp_path / "one", overrides)])
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         f"--master_port={free_port()}", *o2f_train(tmp_path / "two", overrides)])
    a = load_checkpoint(tmp_path / "one" / "last.pt")
    b = load_checkpoint(tmp_path / "two" / "last.pt")
    assert a["state"]["global_iter"] == b["state"]["global_iter"] == 4
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, atol=1e-5, rtol=0, msg=key)
    # both runs trained: the weights moved from the ones they started from (train.seed)
    torch.manual_seed(0)
    initial = dict(O2F(load_config("digits", overrides).model).named_parameters())
    for trained in (a, b):
        moved = [k for k, v in initial.items() if not torch.equal(trained["model"][k], v)]
        assert len(moved) == len(initial), set(initial) - set(moved)
        update = torch.cat([(trained["model"][k] - v.detach()).flatten()
                            for k, v in initial.items()])
        assert update.norm() > 1e-3


def test_two_nodes_on_one_machine_train_and_evaluate(data, tmp_path):
    overrides = rect_overrides(data, **{"train.max_iters": 2, "train.epochs": 1,
                                        "train.eval_every": 1})
    port = free_port()
    common = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
              "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}"]
    work = tmp_path / "two_nodes"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    nodes = [subprocess.Popen([*common, f"--node_rank={rank}", *o2f_train(work, overrides)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err[-3000:]
    metrics = (work / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and '"AP"' in metrics[0]
