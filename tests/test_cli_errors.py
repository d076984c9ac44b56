"""Bad input: one clear line naming the field, exit code 2, nothing started."""

import os
import socket
import subprocess
import sys
import time

import pytest

from orchestrator import store, sweep
from orchestrator.spec import load
from tests.conftest import ROOT, cli, write_spec


@pytest.mark.parametrize("fields, expect", [
    ({"replica": 3}, "replica: unknown key"),
    ({"replicas": 0}, "replicas: Input should be greater than 0"),
    ({"workloads": [{"arch": "resnet9000", "dataset": "digits"}]}, "workloads.0.arch: unknown arch 'resnet9000'"),
    ({"noise": ["loud"]}, "noise.0: unknown preset 'loud'"),
    ({"accelerators": ["A100; rm -rf /"]}, "accelerators.0: String should match pattern"),
])
def test_bad_spec_exits_2_with_one_line(tmp_path, capsys, fields, expect):
    """In this process (main's return value is `python -m`'s exit code: the tests below run it as a
    command); a process each cost ~3 s of imports."""
    code = sweep.main([str(write_spec(tmp_path / "bad.yaml", **fields)), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


@pytest.mark.parametrize("sets, expect", [
    (["replicas"], "--set replicas: not key=value; give key=value with a dotted path"),
    (["workloads.3.epochs=1"], "--set workloads.3.epochs=1: workloads is a list of 1; give an index 0..0"),
    (["replicas.x=1"], "--set replicas.x=1: replicas is int 2, not a mapping or list; shorten the path"),
    (["workloads.0.epochz=1"], "bad.yaml with --set: workloads.0.epochz: unknown key; remove it or fix its spelling"),
    (["replicas=0"], "bad.yaml with --set: replicas: Input should be greater than 0"),
])
def test_a_bad_override_exits_2_with_one_line(tmp_path, capsys, sets, expect):
    args = [a for s in sets for a in ("--set", s)]
    code = sweep.main([str(write_spec(tmp_path / "bad.yaml")), "--out", str(tmp_path / "out"), *args])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expect in lines[0], err
    assert not (tmp_path / "out").exists()


def test_overrides_apply_by_dotted_path_as_yaml_values_before_validation(tmp_path):
    path = write_spec(tmp_path / "s.yaml")
    before = load(path)
    spec = load(path, ["replicas=3", "workloads.0.epochs=1", "tooling.num_threads=[1, 2]", "replicas=4"])
    assert (spec.replicas, spec.workloads[0].epochs, spec.tooling.num_threads) == (4, 1, [1, 2])  # last one wins
    assert before.replicas == 2 and load(path) == before  # the file itself is untouched


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nworkloads: [\n")
    r = cli(str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "malformed YAML at line" in r.stderr


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    r = cli(str(write_spec(tmp_path / "s.yaml")), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--out:" in r.stderr and "is a file" in r.stderr


def test_a_huge_grid_is_refused_at_once_naming_its_size(tmp_path):
    """100,000,000 replicas: counted, never expanded (that took minutes without a word)."""
    t0 = time.time()
    r = cli(str(write_spec(tmp_path / "s.yaml", replicas=100_000_000)), "--out", str(tmp_path / "out"), timeout=120)
    assert r.returncode == 2 and time.time() - t0 < 60, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "replicas: the sweep expands to 100,000,000 runs" in lines[0], r.stderr
    assert not (tmp_path / "out").exists()


def test_a_config_that_is_not_utf8_text(tmp_path):
    (tmp_path / "s.yaml").write_bytes(b"name: x\nreplicas: \xff\xfe\x00\x01\n")
    r = cli(str(tmp_path / "s.yaml"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "not UTF-8 text" in lines[0], r.stderr


@pytest.fixture
def closed_port():
    """A port on 127.0.0.1 that nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", ["sweep", "reduce"])
def test_unreachable_object_storage_fails_in_time_with_one_line(tmp_path, closed_port, command):
    uri = "s3://no-such-bucket/study"
    env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port}", "AWS_ACCESS_KEY_ID": "x",
           "AWS_SECRET_ACCESS_KEY": "x", "AWS_DEFAULT_REGION": "us-east-1"}
    args = [str(write_spec(tmp_path / "s.yaml")), "--out", uri] if command == "sweep" else [uri]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", f"orchestrator.{command}", *args], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=store.REMOTE_TIMEOUT_S * 4)
    assert time.time() - t0 < store.REMOTE_TIMEOUT_S * 2
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {uri}: cannot access the results storage") and "AWS_ENDPOINT_URL" in lines[0]


def test_reduce_accepts_spaces_in_format(tmp_path):
    r = subprocess.run([sys.executable, "-m", "orchestrator.reduce", str(tmp_path / "none"), "--format", "md, csv"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "no such results tree" in r.stderr and "--format" not in r.stderr


@pytest.mark.parametrize("error, expect", [
    (RuntimeError("Failed to connect to GCS. Last connection error: InvalidAuthToken: Authentication token is "
                  "missing or incorrect"), "export RAY_AUTH_MODE=token"),
    (RuntimeError("Failed to connect to GCS. Last connection error: Traceback ...\n  File ..."), "cannot join"),
])
def test_cluster_connection_failures_say_what_to_set(error, expect):
    from ray.exceptions import AuthenticationError

    for e in (error, AuthenticationError("Token authentication is enabled but no authentication token was found")):
        msg = str(sweep.connect_error("10.0.0.1:6379", e))
        assert len(msg.splitlines()) == 1 and "10.0.0.1:6379" in msg
    assert expect in str(sweep.connect_error("10.0.0.1:6379", error))
    assert "RAY_AUTH_TOKEN" in str(sweep.connect_error("10.0.0.1:6379", AuthenticationError("no token")))


def test_object_storage_waits_are_bounded():
    """The clients' own defaults wait far longer (GCS retries for 15 minutes); no network needed."""
    from datetime import timedelta

    gcs, path = store.resolve("gs://bucket/study")
    assert path == "bucket/study"
    assert gcs.__reduce__()[1][0]["retry_time_limit"] == timedelta(seconds=store.REMOTE_TIMEOUT_S)
    s3, _ = store.resolve("s3://bucket/study?region=eu-west-1&endpoint_override=127.0.0.1:9&scheme=http")
    options = s3.__reduce__()[1][0]  # the URI's own options survive the rebuild
    assert options["connect_timeout"] == store.CONNECT_TIMEOUT_S
    assert (options["region"], options["endpoint_override"], options["scheme"]) == ("eu-west-1", "127.0.0.1:9", "http")
