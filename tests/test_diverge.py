"""The tracing core: where two settings part (orchestrator/diverge.py), on real models on a CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
import yaml
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from orchestrator import diverge, reduce, report, runner, spec
from orchestrator.diverge import OpRecord, first_parting, trace
from tests.conftest import ROOT, write_spec


def conv_net(steps: int = 2):
    """`steps` SGD steps of a small conv net on fixed random data, to trace; the model and data are
    made here, outside the trace (the ISA changes the initialisation's bits too, at `uniform_`)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 14 * 14, 10))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x, y = torch.randn(64, 3, 16, 16), torch.randint(0, 10, (64,))

    def run():
        for _ in range(steps):
            loss = nn.functional.cross_entropy(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return run


def conv_steps() -> None:
    conv_net()()


def attention_steps(backend: SDPBackend) -> None:
    torch.manual_seed(0)
    m = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    x = torch.randn(8, 16, 32)
    with sdpa_kernel(backend):
        for _ in range(2):
            loss = m(x).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()


@pytest.fixture
def threads():
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def test_identical_settings_are_identical():
    a, b = trace(conv_net()), trace(conv_net())
    parting = first_parting(a, b)
    assert parting.op is None and parting.ops == len(a) > 50
    assert parting.describe() == f"identical over {len(a)} ops"
    phases = {r.phase for r in a}
    assert phases == {"forward", "backward", "optimizer"}
    assert max(r.step for r in a) == 1  # two steps: 0 and 1


def test_one_against_two_threads_parts_at_a_matmul(threads):
    threads(1)
    a = trace(conv_steps)
    threads(2)
    b = trace(conv_steps)
    p = first_parting(a, b)
    assert p.op in ("aten.mm.default", "aten.addmm.default"), p.describe()
    assert p.same_ops and p.phase == "forward" and p.step == 0
    assert p.module == "Sequential.3" and 0 <= p.rel_size < 1e-4
    assert p.later_differing > 0


def test_math_against_flash_attention_parts_inside_attention_with_other_ops():
    a, b = trace(lambda: attention_steps(SDPBackend.MATH)), trace(lambda: attention_steps(SDPBackend.FLASH_ATTENTION))
    assert len(a) != len(b)  # different op sequences: a zip would compare unrelated ops
    p = first_parting(a, b)
    assert not p.same_ops and p.module.endswith("self_attn"), p.describe()
    assert "flash" in p.op and p.step == 0 and p.phase == "forward"
    # the ops before the attention are identical (the alignment starts from a common prefix)
    assert all(x.digest == y.digest for x, y in zip(a[: p.index_a], b[: p.index_b]))


def test_cap_on_ops_truncates_the_trace():
    records = trace(conv_steps, max_ops=10)
    assert len(records) == 10 and [r.index for r in records] == list(range(10))


def test_alignment_counts_an_inserted_op_once():
    """An op present in one trace only is one difference; the ops after it are compared with their counterparts."""
    def rec(i, op, digest):
        return OpRecord(i, 0, "forward", "m", op, "2", "float32", digest, 1.0, 1.0)
    a = [rec(0, "x", "1"), rec(1, "y", "2"), rec(2, "z", "3")]
    b = [rec(0, "x", "1"), rec(1, "w", "9"), rec(2, "y", "2"), rec(3, "z", "3")]
    p = first_parting(a, b)
    assert (p.index_a, p.index_b, p.op, p.later_differing) == (None, 1, "- | w", 0)


SCRIPT = """
import json, sys
from orchestrator.diverge import trace
from tests.test_diverge import conv_net
print(json.dumps([r.__dict__ for r in trace(conv_net())]))
"""


def traced_in(env: dict) -> list[OpRecord]:
    """The conv net's trace in a fresh interpreter with `env` (ISA variables act before torch imports)."""
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=os.environ | env | {"OMP_NUM_THREADS": "1"},
                         check=True, capture_output=True, text=True).stdout
    return [OpRecord(**r) for r in json.loads(out)]


def test_isa_stack_against_launch_environment_parts_at_a_forward_convolution():
    p = first_parting(traced_in({}), traced_in({"ATEN_CPU_CAPABILITY": "default"}))
    assert p.op == "aten.convolution.default" and p.phase == "forward" and p.step == 0, p.describe()


# --- the command: two runs of a sweep, each replayed in its own setting ------------------------

EXAMPLE = {"entrypoint": "examples.own_training:train", "name": "digits_cnn", "dataset": "sklearn_digits",
           "args": {"epochs": 1}}


@pytest.fixture(scope="module")
def sweep_out(tmp_path_factory):
    """A results tree holding only a sweep.yaml: a built-in and a user's workload, two stacks, two thread counts."""
    out = tmp_path_factory.mktemp("out")
    write_spec(out / "sweep.yaml", replicas=1, tooling={"num_threads": [1, 2]},
               workloads=[{"arch": "small_cnn", "dataset": "digits", "epochs": 1, "batch_size": 64, "lr": 0.002,
                           "optimizer": "adam"}, EXAMPLE],
               stacks=[{"name": "launch"}, {"name": "isa-default", "env_vars": {"ATEN_CPU_CAPABILITY": "default"}}])
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "orchestrator.diverge", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)


def test_isa_stack_replayed_in_its_environment_parts_and_the_table_is_written(sweep_out):
    """The env-var stack's replay runs in a fresh interpreter where ATEN_CPU_CAPABILITY is set before torch
    imports: it parts from the launch environment, in the first step, at a kernel the ISA dispatch picks
    (the initialisation's uniform_ before any module runs, or the first forward convolution)."""
    done = cli(str(sweep_out), "--a", "arch=small_cnn,num_threads=1,stack=launch",
               "--b", "arch=small_cnn,num_threads=1,stack=isa-default")
    assert done.returncode == 0, done.stderr
    row = pd.read_parquet(sweep_out / "tables" / "diverge.parquet").iloc[0]
    assert (row["phase"], row["op"]) in {("setup", "aten.uniform_.default"), ("forward", "aten.convolution.default")}
    assert row["step"] == 0 and row["later_differing"] > 0 and row["summary"] in done.stdout
    assert (sweep_out / "tables" / "diverge.md").exists()


def test_entrypoint_workload_traced_and_identical_with_itself(sweep_out):
    runs = spec.expand(spec.parse(yaml.safe_load((sweep_out / "sweep.yaml").read_text())))
    user = next(r for r in runs if r.workload.arch == "digits_cnn" and r.stack.name == "launch" and r.num_threads == 1)
    records = diverge.replay(user, steps=2)
    assert {r.phase for r in records} >= {"forward", "backward", "optimizer"} and records[-1].step == 1
    assert any(r.op == "aten.convolution.default" for r in records)
    table = diverge.diverge(str(sweep_out), {"run_id": user.run_id}, {"run_id": user.run_id}, steps=1)
    assert table["summary"].iloc[0].startswith("identical over ") and table["op"].isna().all()


def test_bad_selector_exits_2_naming_the_values_present(sweep_out, capsys):
    assert diverge.main([str(sweep_out), "--a", "num_threads=3", "--b", "num_threads=1"]) == 2  # in this process
    err = capsys.readouterr().err
    assert "--a: no run of the sweep has {'num_threads': '3'}" in err and "'1', '2'" in err


# --- divergence over training: per-epoch digests and sketches --------------------------------------

SYNTHETIC = {"arch": "small_cnn", "dataset": "synthetic", "epochs": 3, "batch_size": 16, "lr": 0.05,
             "dataset_args": {"n_train": 64, "n_test": 16, "image_size": 8}}


def test_sketch_is_one_linear_projection_that_sizes_distances():
    g = torch.Generator().manual_seed(1)
    a = {"w": torch.randn(5000, generator=g), "b": torch.randn(300, generator=g), "n": torch.tensor(3)}
    b = {k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in a.items()}
    plan = runner.sketch_plan(a)
    assert plan.keys() == {"b", "w"} and runner.sketch_plan(b)["w"][0].equal(plan["w"][0])  # same for every run
    sa, sb = (torch.tensor(runner.weights_sketch(s, plan)) for s in (a, b))
    assert len(sa) == runner.SKETCH_SIZE
    true = torch.cat([(a[k] - b[k]).double() for k in ("b", "w")]).norm()
    assert 0.5 < float((sa - sb).norm() / true) < 2


def test_divergence_table_algo_parts_at_epoch_one_and_control_never(tmp_path):
    runs = spec.expand(spec.parse({"name": "d", "replicas": 2, "noise": ["control", "algo"], "workloads": [SYNTHETIC]}))
    rows = [runner.run(r, str(tmp_path)) for r in runs]
    assert all(len(r["epoch_weights_sha256"]) == 3 and len(r["epoch_sketch"][0]) == runner.SKETCH_SIZE for r in rows)
    assert rows[-1]["epoch_weights_sha256"][-1] == rows[-1]["weights_sha256"]  # the last epoch's is the final one
    table = reduce.reduce(str(tmp_path), fmt=("parquet",))["divergence"].set_index(["noise", "epoch"])
    assert (tmp_path / "tables" / "divergence.parquet").exists()
    control, algo = table.loc["control"], table.loc["algo"]
    assert control["first_parting_epoch"].isna().all() and (control["identical_fraction"] == 1).all()
    assert (control["distance"] == 0).all()
    assert (algo["first_parting_epoch"] == 1).all() and (algo["identical_fraction"] == 0).all()
    assert (algo["distance"] > 0).all() and list(algo.index) == [1, 2, 3]
    page = (tmp_path / "tables" / "report.html")
    report.write_report(str(tmp_path))
    assert "Divergence over training" in page.read_text() and "First op that differs" not in page.read_text()
