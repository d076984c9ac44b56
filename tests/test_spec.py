"""Spec validation, expansion and stable ids; noise seeds and switches. No Ray needed."""

import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator import noise, spec
from orchestrator.spec import SpecError


def doc(**fields):
    d = {"name": "s", "workloads": [{"arch": "small_cnn", "dataset": "digits"}]}
    return d | fields


def test_expand_counts_every_axis():
    s = spec.parse(doc(replicas=3, noise=["control", "algo"], tooling={"num_threads": [1, 2]},
                       accelerators=["T4", "A100"], resources={"gpus": 0.5},
                       workloads=[{"arch": "small_cnn", "dataset": "digits"},
                                  {"arch": "mlp", "dataset": "digits", "replicas": 1}]))
    runs = spec.expand(s)
    assert len(runs) == 2 * 2 * 2 * (3 + 1)
    assert len({r.run_id for r in runs}) == len(runs)
    two = next(r for r in runs if r.num_threads == 2)
    assert two.cpus == 2 and two.gpus == 0.5  # a run asks Ray for at least as many CPUs as threads


def test_run_ids_are_stable_across_processes():
    """Same spec, same ids on any machine: no salted hash(), no dict-order dependence."""
    code = ("from orchestrator import spec;"
            "print(','.join(r.run_id for r in spec.expand(spec.load(None))))")
    a, b = (subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}).stdout for seed in ("1", "2"))
    assert a == b and a.count(",") == 19
    assert a.split(",")[0] == "small_cnn-digits-control-r0-" + a.split(",")[0].rsplit("-", 1)[1]


def test_defaults_do_not_enter_the_id():
    """A field added later with a default must keep existing results' ids valid."""
    a = spec.expand(spec.parse(doc()))[0].run_id
    b = spec.expand(spec.parse(doc(workloads=[{"arch": "small_cnn", "dataset": "digits", "weight_decay": 0.0}])))[0].run_id
    c = spec.expand(spec.parse(doc(workloads=[{"arch": "small_cnn", "dataset": "digits", "weight_decay": 0.1}])))[0].run_id
    assert a == b != c


def test_fixed_sources_share_seeds_varying_ones_do_not():
    runs = spec.expand(spec.parse(doc(replicas=3, noise=["init"])))
    assert len({r.seeds.init for r in runs}) == 3
    assert len({r.seeds.order for r in runs}) == len({r.seeds.augment for r in runs}) == 1
    assert runs[0].seeds.order != runs[0].seeds.augment  # fixed sources still get distinct streams


def test_explicit_source_sets():
    runs = spec.expand(spec.parse(doc(replicas=2, noise=[{"name": "order+impl", "vary": ["order", "impl"]}])))
    assert runs[0].noise == "order+impl" and runs[0].vary == {"order", "impl"}


@pytest.mark.parametrize("fields, field", [
    ({"workloads": []}, "workloads"),
    ({"workloads": [{"arch": "small_cnn", "dataset": "mnist9"}]}, "workloads.0.dataset"),
    ({"workloads": [{"arch": "small_cnn", "dataset": "digits", "epochs": "many"}]}, "workloads.0.epochs"),
    ({"accelerators": ["A100"]}, "resources.gpus"),
    ({"resources": {"cpus": 0}}, "resources.cpus"),
    ({"name": "../etc"}, "name"),
])
def test_errors_name_the_field(fields, field):
    with pytest.raises(SpecError) as e:
        spec.parse(doc(**fields), "x.yaml")
    assert str(e.value).startswith(f"x.yaml: {field}")


def test_every_error_is_reported_at_once():
    with pytest.raises(SpecError) as e:
        spec.parse(doc(replicas=0, colour="blue"), "x.yaml")
    assert len(str(e.value).splitlines()) == 2


def test_cross_field_rules_are_reported_with_field_errors():
    """A pinned run without GPUs is reported beside a field error, not only after it is fixed."""
    with pytest.raises(SpecError) as e:
        spec.parse(doc(replicas=0, accelerators=["T4"]), "x.yaml")
    assert str(e.value).splitlines() == ["x.yaml: replicas: Input should be greater than 0",
                                         "x.yaml: resources.gpus: runs pinned to an accelerator need gpus > 0 (e.g. 1 or 0.5)"]


def test_a_rule_reading_an_invalid_field_is_not_guessed():
    with pytest.raises(SpecError) as e:
        spec.parse(doc(accelerators=["T4"], resources={"gpus": "lots"}), "x.yaml")
    assert len(str(e.value).splitlines()) == 1 and "resources.gpus: Input should be a valid number" in str(e.value)


def test_a_bad_noise_set_does_not_hide_an_unknown_preset():
    with pytest.raises(SpecError) as e:
        spec.parse(doc(noise=["algoo", {"name": "x", "vary": ["bogus"]}, 3]), "x.yaml")
    lines = str(e.value).splitlines()
    assert lines[0].startswith("x.yaml: noise.0: unknown preset 'algoo'")
    assert lines[1].startswith("x.yaml: noise.1.vary.0: Input should be 'init'")
    assert lines[2] == "x.yaml: noise.2: expected a preset name or {name, vary}"
    assert len(lines) == 3


def test_the_run_count_is_computed_without_expanding():
    s = spec.parse(doc(replicas=3, noise=["control", "algo"], tooling={"num_threads": [1, 2], "cudnn_benchmark": [False, True]},
                       workloads=[{"arch": "small_cnn", "dataset": "digits"},
                                  {"arch": "mlp", "dataset": "digits", "replicas": 1}]))
    assert spec.n_runs(s) == len(spec.expand(s)) == 2 * 2 * 2 * (3 + 1)
    with pytest.raises(SpecError, match=r"x.yaml: replicas: the sweep expands to 2,000,000 runs"):
        spec.parse(doc(replicas=1_000_000, noise=["control", "algo"]), "x.yaml")
    assert spec.n_runs(spec.parse(doc(replicas=spec.MAX_RUNS, noise=["control"]))) == spec.MAX_RUNS


def test_derive_seed_is_a_pure_function_of_its_inputs():
    assert noise.derive_seed(0, "init", 3) == noise.derive_seed(0, "init", 3)
    assert len({noise.derive_seed(b, s, r) for b in (0, 1) for s in noise.ALGO for r in (None, 0, 1)}) == 18
    assert 0 <= noise.derive_seed(7, "order", 1) < 2**63


def test_apply_impl_sets_and_reports_the_switches():
    try:
        det = noise.apply_impl(True)
        assert det == {"use_deterministic_algorithms": True, "cudnn_deterministic": True,
                       "cudnn_benchmark": False, "cublas_workspace_config": ":4096:8"}
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        free = noise.apply_impl(False)
        assert free["use_deterministic_algorithms"] is False and free["cudnn_deterministic"] is False
        assert free["cudnn_benchmark"] is False  # PyTorch's default: autotuning is its own axis, not impl
        assert free["cublas_workspace_config"] is None
        for det in (True, False):  # autotuning follows its own switch whatever the determinism mode
            assert noise.apply_impl(det, cudnn_benchmark=True)["cudnn_benchmark"] is True
            assert torch.backends.cudnn.benchmark and torch.backends.cudnn.deterministic is det
    finally:
        noise.apply_impl(False)


def test_compiled_runs_set_inductor_determinism_both_ways():
    import torch._inductor.config as inductor

    try:
        assert noise.apply_impl(True, compile=True)["inductor_deterministic"] is True
        assert inductor.deterministic is True
        assert noise.apply_impl(False, compile=True)["inductor_deterministic"] is False
        assert inductor.deterministic is False  # a reused worker's next compiled run starts clean
        assert "inductor_deterministic" not in noise.apply_impl(True)  # eager runs: not applicable
    finally:
        noise.apply_impl(False, compile=True)
        noise.apply_impl(False)


def test_global_rng_seed_is_apart_from_augment_yet_follows_it():
    runs = spec.expand(spec.parse({"name": "g", "replicas": 2, "noise": ["control", "augment"],
                                   "workloads": [{"arch": "mlp", "dataset": "digits"}]}))
    control, augment = runs[:2], runs[2:]
    assert all(r.seeds.global_rng != r.seeds.augment for r in runs)
    assert control[0].seeds.global_rng == control[1].seeds.global_rng  # fixed with the augment source
    assert augment[0].seeds.global_rng != augment[1].seeds.global_rng  # varies with it
    assert 0 <= runs[0].seeds.global_rng < 2**63


def test_default_sweep_ships_in_the_package():
    s = spec.load(None)
    assert s.name == "digits-demo" and len(spec.expand(s)) == 20


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20)
FIELDS = ["name", "base_seed", "out", "replicas", "noise", "accelerators", "tooling", "resources",
          "max_retries", "workloads"]


@settings(max_examples=300, deadline=None)
@given(st.one_of(
    json_values,
    st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6),  # right keys, random values
    st.fixed_dictionaries({"name": st.text(max_size=10), "workloads": st.lists(
        st.dictionaries(st.sampled_from(["arch", "dataset", "epochs", "lr", "arch_args", "replicas"]),
                        json_values), max_size=2)}),
))
def test_any_document_gives_a_spec_or_a_spec_error(document):
    try:
        s = spec.parse(document)
    except SpecError as e:
        assert str(e) and all(line.startswith("spec: ") for line in str(e).splitlines())
    else:
        assert spec.expand(s)


def test_bitflip_on_an_entrypoint_workload_is_refused():
    """The flip needs the model the built-in loop builds; a user function's model is out of reach."""
    user = {"entrypoint": "examples.own_training:train", "name": "mine", "dataset": "sklearn_digits"}
    with pytest.raises(SpecError) as e:
        spec.parse(doc(noise=["control", {"name": "flip", "vary": ["bitflip"]}], workloads=[user]), "x.yaml")
    assert str(e.value).startswith("x.yaml: noise: bitflip flips a bit of the model the built-in loop builds")
    spec.parse(doc(noise=["control", "bitflip"]), "x.yaml")  # built-in workloads take it
