"""Distributed PSP training matches one device: MirroredStrategy, MultiWorkerMirroredStrategy.

Runs examples/distributed_train.py in fresh processes (the CPU is split into
logical devices before TensorFlow initializes): on one device, with
MirroredStrategy over 2 logical CPUs (Keras `fit`), and as 2 local
MultiWorkerMirroredStrategy workers on localhost ports (TF_CONFIG; custom loop,
see the example). Same data, same global batch, SGD with momentum, seeded
weights: every replica ends with the same alphas, masks and regularization
loss as one device, up to float32 round-off.
"""

import contextlib
import json
import os
import pathlib
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "distributed_train.py"
TOLERANCE = 1e-5  # measured: 1.5e-7 (float32 summation order of the all-reduce)

pytestmark = [
    pytest.mark.slow,  # six TensorFlow processes
    pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                       reason="tf.distribute needs TensorFlow"),
]


def _reserved_port(stack):
    """A localhost port for a worker, held until `stack` closes.

    Picking a free port and releasing it before the worker binds it leaves a
    window (the worker binds seconds later, after importing TensorFlow) in
    which any other bind(0) or outgoing connection on the machine can take it.
    Instead the port stays bound here, with SO_REUSEADDR and never listening:
    the kernel gives it to no other bind(0) or connection, and the worker's
    gRPC server (which sets SO_REUSEADDR too) can still bind and listen on it.
    """
    s = stack.enter_context(socket.socket())
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _start(args, summary, tf_config=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    command = [sys.executable, str(EXAMPLE), f"--summary={summary}", *args]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=summary.parent)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Summaries of the four processes, started together (each is mostly start-up)."""
    directory = tmp_path_factory.mktemp("distributed")
    with contextlib.ExitStack() as ports:
        workers = [f"localhost:{_reserved_port(ports)}" for _ in range(2)]
        results = _run_all(directory, workers)
    results["directory"] = directory
    return results


def _run_all(directory, workers):
    """Starts every process, waits for all; returns their summaries by name."""
    started = {
        "single": _start(["--strategy=default", "--logical_cpus=0"], directory / "single.json"),
        "mirrored": _start(["--strategy=mirrored", "--logical_cpus=2",
                            f"--output={directory / 'mirrored_small.keras'}"],
                           directory / "mirrored.json"),
    }
    for coupling in ("group",):
        started[f"single_{coupling}"] = _start(
            ["--strategy=default", "--logical_cpus=0", f"--coupling={coupling}"],
            directory / f"single_{coupling}.json")
        started[f"mirrored_{coupling}"] = _start(
            ["--strategy=mirrored", "--logical_cpus=2", f"--coupling={coupling}"],
            directory / f"mirrored_{coupling}.json")
    for index in range(2):
        started[f"worker{index}"] = _start(
            ["--strategy=multiworker", "--logical_cpus=0",
             f"--output={directory / 'multiworker_small.keras'}"],
            directory / f"worker{index}.json",
            {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
    results = {}
    try:
        for name, process in started.items():
            output, _ = process.communicate(timeout=300)
            assert process.returncode == 0, f"{name} failed:\n{output[-3000:]}"
            results[name] = json.loads((directory / f"{name}.json").read_text())
    finally:  # a worker whose peer failed would wait for it forever
        for process in started.values():
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def test_a_reserved_port_is_refused_to_other_binds():
    with contextlib.ExitStack() as stack:
        port = _reserved_port(stack)
        with socket.socket() as other, pytest.raises(OSError, match="in use"):
            other.bind(("localhost", port))


def _assert_same_training(run, reference):
    assert run["masks"] == reference["masks"]
    assert run["epsilons"] == reference["epsilons"]
    for key in ("alphas", "kernels"):
        assert set(run[key]) == set(reference[key])
        for name in reference[key]:
            np.testing.assert_allclose(run[key][name], reference[key][name], rtol=0,
                                       atol=TOLERANCE, err_msg=f"{key} of {name}")
    np.testing.assert_allclose(run["losses"], reference["losses"], rtol=TOLERANCE)
    np.testing.assert_allclose(run["regularization_loss"], reference["regularization_loss"],
                               rtol=TOLERANCE)


def test_mirrored_strategy_over_two_cpus_matches_one_device(runs):
    mirrored, single = runs["mirrored"], runs["single"]
    assert single["replicas"] == 1 and mirrored["replicas"] == 2
    assert set(mirrored["replica_count"].values()) == {2}  # a copy of alpha per replica
    assert mirrored["replica_alpha_spread"] == 0.0  # the copies are identical
    assert single["losses"][-1] < single["losses"][0]
    _assert_same_training(mirrored, single)


def test_group_alphas_under_mirrored_strategy_match_one_device(runs):
    mirrored, single = runs["mirrored_group"], runs["single_group"]
    assert mirrored["replicas"] == 2 and mirrored["replica_alpha_spread"] == 0.0
    # One group: conv1's and conv2's outputs tied by Add, read by conv2 and the head.
    assert list(single["alphas"]) == ["alpha_conv1"] and len(single["alphas"]["alpha_conv1"]) == 8
    assert single["losses"][-1] < single["losses"][0]
    _assert_same_training(mirrored, single)


def test_two_multiworker_workers_match_one_device_and_the_chief_shrinks(runs):
    import tf_psp  # noqa: F401  (nothing needed: the shrunk model is plain)

    for index in range(2):
        worker = runs[f"worker{index}"]
        assert worker["replicas"] == 2 and worker["replica_alpha_spread"] == 0.0
        _assert_same_training(worker, runs["single"])
    assert runs["worker0"]["alphas"] == runs["worker1"]["alphas"]
    small = keras.models.load_model(runs["directory"] / "multiworker_small.keras")
    assert not any(type(layer).__module__.startswith("tf_psp") for layer in small.layers)
