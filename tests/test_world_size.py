"""Data-parallel replicas (tooling.world_size): a warm group of rank processes with a gloo process
group, on a real local Ray cluster of 2 CPUs: a world-size-2 replica is two processes of 1 CPU each,
its coordinating trial holding no CPU."""

import pytest

from orchestrator import reduce, store, sweep
from tests.conftest import write_spec

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ddp_out(ray_local, tmp_path_factory):
    """One results tree, two sweeps. First control at world size 1 and 2: the built-in loop (mlp on
    digits), a user function whose rank 1 raises, one that raises on every rank in replica 0, and one
    whose rank 1 process is killed on its first try (in that order: one replica at a time). Then algo at world size 2: your own DDP function (examples/own_training_ddp.py)."""
    tmp = tmp_path_factory.mktemp("ddp")
    builtin = {"arch": "mlp", "dataset": "digits", "epochs": 2, "batch_size": 64, "lr": 0.05, "replicas": 2}
    raises = {"entrypoint": "tests.user_functions:raises_on_rank_1", "name": "f", "dataset": "four", "replicas": 1}
    every = {"entrypoint": "tests.user_functions:raises_in_replica_0", "name": "every", "dataset": "four",
             "replicas": 2}
    dies = {"entrypoint": "tests.user_functions:rank_1_dies_once", "name": "dies", "dataset": "four", "replicas": 1,
            "args": {"marker": str(tmp / "killed")}}
    example = {"entrypoint": "examples.own_training_ddp:train", "name": "ddp", "dataset": "sklearn_digits",
               "args": {"epochs": 1, "batch_size": 64, "lr": 0.1}}
    out = tmp / "out"
    a = write_spec(tmp / "a.yaml", name="ddp", noise=["control"], tooling={"world_size": [1, 2]},
                   workloads=[builtin, raises, every, dies])
    assert sweep.main([str(a), "--out", str(out)]) == 1  # the raising rank fails its replica
    b = write_spec(tmp / "b.yaml", name="ddp", replicas=2, noise=["algo"], tooling={"world_size": [2]},
                   workloads=[example])
    assert sweep.main([str(b), "--out", str(out)]) == 0
    return out, store.read_runs(str(out)).to_pandas()


def test_control_replicas_at_world_size_2_are_bitwise_identical(ddp_out):
    _, df = ddp_out
    two = df[(df.world_size == 2) & (df.arch == "mlp")]
    assert len(two) == 2 and (two.status == "ok").all(), two.error.tolist()
    assert two.weights_sha256.nunique() == 1 and len({tuple(p) for p in two.predictions}) == 1


def test_algo_replicas_of_your_own_ddp_function_differ(ddp_out):
    _, df = ddp_out
    algo = df[df.noise == "algo"]
    assert len(algo) == 2 and (algo.status == "ok").all() and algo.weights_sha256.nunique() == 2
    assert (algo.arch == "ddp").all() and (algo.epochs == 1).all()  # rank 0's ctx.report calls


def test_each_rank_is_its_own_process_and_recorded(ddp_out):
    _, df = ddp_out
    two = df[(df.world_size == 2) & (df.status == "ok")]
    assert len(two) == 6  # mlp x 2, every r1, dies, algo x 2
    for r in two.itertuples():
        assert len(r.rank_pids) == 2 and len(set(r.rank_pids)) == 2 and r.worker_pid == r.rank_pids[0]
        assert len(r.rank_nodes) == 2 and r.dist_backend == "gloo" and r.ranks_agree
    one = df[df.world_size == 1]
    assert one.dist_backend.isna().all() and one.rank_pids.map(len).eq(1).all()


def test_world_sizes_are_paired_in_cross_stack(ddp_out):
    out, _ = ddp_out
    tables = reduce.reduce(str(out))
    cs = tables["cross_stack"]
    rows = cs[(cs.world_size_a == 1) & (cs.world_size_b == 2) & (cs.arch == "mlp")]
    assert len(rows) == 1 and rows.n_pairs.iloc[0] == 2 and rows.noise.iloc[0] == "control"
    assert set(tables["variance"].world_size) == {1, 2}


def test_a_rank_that_raises_fails_the_replica_naming_it(ddp_out):
    _, df = ddp_out
    f = df[df.arch == "f"].set_index("world_size")
    assert f.loc[1].status == "ok"  # at world size 1 there is no rank 1
    assert f.loc[2].status == "failed" and f.loc[2].error.startswith("rank 1 of 2: ")
    assert "rank one broke" in f.loc[2].error and "\n" not in f.loc[2].error


def test_a_group_whose_ranks_all_returned_stays_warm_after_a_failure(ddp_out):
    """Replica 0 of `every` failed on both ranks, which returned and passed a barrier: replica 1 ran
    in the same group (its rank 0 had run one replica before), and so did the next replica, whose
    rank 1 was then killed; the killed rank's group is rebuilt for its retry."""
    out, df = ddp_out
    every = df[(df.arch == "every") & (df.world_size == 2)].set_index("replica")
    assert every.loc[0].status == "failed" and every.loc[0].error.startswith("rank 0 of 2: ")
    assert every.loc[1].status == "ok" and every.loc[1].worker_runs == 1
    killed = int((out.parent / "killed").read_text())
    assert killed == every.loc[1].rank_pids[1]
    dies = df[(df.arch == "dies") & (df.world_size == 2)].iloc[0]
    assert dies.status == "ok" and dies.attempts == 2 and killed not in dies.rank_pids


def test_a_batch_not_divisible_by_the_world_size_is_a_spec_error(tmp_path, capsys):
    path = write_spec(tmp_path / "s.yaml", tooling={"world_size": [1, 3]})  # batch_size 64
    assert sweep.main([str(path), "--out", str(tmp_path / "out")]) == 2  # in this process, as test_cli_errors
    assert "tooling.world_size: 3 does not divide batch_size 64 of small_cnn on digits" in capsys.readouterr().err


def test_a_replica_no_cluster_can_hold_is_refused_before_anything_starts(ray_local, tmp_path, capsys):
    path = write_spec(tmp_path / "s.yaml", tooling={"world_size": [4]})
    assert sweep.main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "a replica of world size 4 needs 4 processes of 1 CPU" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_killed_rank_is_retried_and_its_attempts_recorded(ddp_out):
    _, df = ddp_out
    dies = df[df.arch == "dies"].set_index("world_size")
    assert dies.loc[1].status == "ok" and dies.loc[1].attempts == 1  # no rank 1: nothing killed
    assert dies.loc[2].status == "ok" and dies.loc[2].attempts == 2  # rank 1 killed on try 1, retried
    assert (df[df.arch == "mlp"].attempts == 1).all()
