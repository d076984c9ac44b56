"""Bad input: one clear line naming the field, exit code 2, nothing started."""

import pytest

from tests.conftest import cli, write_spec


@pytest.mark.parametrize("fields, expect", [
    ({"replica": 3}, "replica: unknown key"),
    ({"replicas": 0}, "replicas: Input should be greater than 0"),
    ({"workloads": [{"arch": "resnet9000", "dataset": "digits"}]}, "workloads.0.arch: unknown arch 'resnet9000'"),
    ({"noise": ["loud"]}, "noise: unknown preset 'loud'"),
    ({"accelerators": ["A100; rm -rf /"]}, "accelerators.0: String should match pattern"),
])
def test_bad_spec_exits_2_with_one_line(tmp_path, fields, expect):
    r = cli(str(write_spec(tmp_path / "bad.yaml", **fields)), "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expect in lines[0], r.stderr
    assert not (tmp_path / "out").exists()  # nothing started, nothing written


def test_malformed_yaml(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\nworkloads: [\n")
    r = cli(str(tmp_path / "bad.yaml"))
    assert r.returncode == 2 and "malformed YAML at line" in r.stderr


def test_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("x")
    r = cli(str(write_spec(tmp_path / "s.yaml")), "--out", str(tmp_path / "f"))
    assert r.returncode == 2 and "--out:" in r.stderr and "is a file" in r.stderr
