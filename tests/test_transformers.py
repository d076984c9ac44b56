"""The transformer workloads end to end: a GPT on modular arithmetic and on a text file this test
writes, and a ViT on digits, train through `python -m orchestrator.sweep` on a real Ray cluster and
reduce; the workload's own rules (tokens take no crops, a schedule's warm-up, models by name) are
spec errors, one line each, exit 2."""

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from orchestrator import reduce, spec, store, sweep
from orchestrator.spec import SpecError
from tests.conftest import write_spec

P = 11  # modular arithmetic mod 11: 121 pairs, half of them train
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32}


def workload(**fields) -> dict:
    return {"arch": "gpt", "dataset": "modular_arithmetic"} | fields


def problems(**fields) -> list[str]:
    with pytest.raises(SpecError) as e:
        spec.parse({"name": "s", "workloads": [workload(**fields)]})
    return str(e.value).splitlines()


# --- the workload's rules ---------------------------------------------------------------------------

def test_the_new_fields_validate_and_keep_old_run_ids():
    s = spec.parse({"name": "s", "workloads": [workload(optimizer="adamw", schedule="cosine", warmup_epochs=0.5,
                                                        grad_clip=1.0)]})
    w = s.workloads[0]
    assert (w.optimizer, w.schedule, w.warmup_epochs, w.grad_clip) == ("adamw", "cosine", 0.5, 1.0)
    plain = {"name": "s", "workloads": [{"arch": "small_cnn", "dataset": "digits"}]}
    explicit = {"name": "s", "workloads": [{"arch": "small_cnn", "dataset": "digits", "schedule": "constant",
                                            "warmup_epochs": 0, "grad_clip": None}]}
    assert spec.expand(spec.parse(plain))[0].run_id == spec.expand(spec.parse(explicit))[0].run_id


def test_tokens_take_no_augmentation_and_only_token_models():
    assert problems(augmentation="crop", arch="small_cnn") == [
        "spec: workloads.0: augmentation: crop crops or flips images; dataset modular_arithmetic is tokens, so use "
        "none (dropout, arch_args.dropout, still draws from the augment source)",
        "spec: workloads.0: arch: small_cnn takes images but dataset modular_arithmetic gives tokens; use gpt or "
        "another dataset"]
    assert problems(dataset="digits") == [
        "spec: workloads.0: arch: gpt takes token windows but dataset digits gives images; use an image model "
        "(e.g. vit) or another dataset"]
    spec.parse({"name": "s", "workloads": [workload(arch="tests.faulty:exit_once")]})  # own builders: their call


def test_warmup_rules():
    assert problems(schedule="onecycle", warmup_epochs=1) == [
        "spec: workloads.0: warmup_epochs: onecycle warms up by itself (torch's OneCycleLR: the first 30% of steps); "
        "set 0 or use schedule cosine"]
    assert problems(epochs=2, warmup_epochs=3) == [
        "spec: workloads.0: warmup_epochs: 3.0 is longer than the 2 epochs trained"]


def test_models_by_name_resolve_or_exit_2_in_one_line_each(tmp_path, capsys):
    s = spec.parse({"name": "s", "workloads": [{"arch": "torchvision:resnet18", "dataset": "digits"},
                                               {"arch": "timm:test_vit", "dataset": "digits"}]})
    assert [w.arch for w in s.workloads] == ["torchvision:resnet18", "timm:test_vit"]
    code = sweep.main([str(write_spec(tmp_path / "bad.yaml", workloads=[  # in this process, as test_cli_errors
        {"arch": "torchvision:resnet9000", "dataset": "digits"}, {"arch": "timm:vit_nope", "dataset": "digits"}])),
        "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert [line.removeprefix("error: ") for line in err.strip().splitlines()] == [
        f"{tmp_path / 'bad.yaml'}: workloads.0.arch: unknown torchvision model 'resnet9000'; list the classification "
        "models with python -c \"import torchvision.models as m; print(m.list_models(module=m))\"",
        f"{tmp_path / 'bad.yaml'}: workloads.1.arch: unknown timm model 'vit_nope'; list them with "
        "python -c \"import timm; print(timm.list_models('vit*'))\""]
    assert not (tmp_path / "out").exists()


# --- end to end on Ray ------------------------------------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 60  # 2,700 characters, 29 distinct


@pytest.fixture(scope="module")
def transformers_out(ray_local, tmp_path_factory):
    """One sweep: GPT on modular arithmetic (AdamW, gradient clipping), GPT on a text file (cosine
    schedule with warm-up, dropout), ViT on digits; control replicas, 2 each."""
    tmp = tmp_path_factory.mktemp("transformers")
    (tmp / "fox.txt").write_text(TEXT, encoding="utf-8")
    workloads = [
        workload(dataset_args={"p": P, "train_fraction": 0.5}, arch_args=TINY, epochs=2, batch_size=16, lr=3e-3,
                 optimizer="adamw", weight_decay=0.1, grad_clip=1.0),
        {"arch": "gpt", "dataset": "text", "dataset_root": str(tmp / "fox.txt"),
         "dataset_args": {"context_length": 16, "test_fraction": 0.2}, "arch_args": TINY | {"dropout": 0.1},
         "epochs": 3, "batch_size": 16, "lr": 1e-2, "optimizer": "adamw", "schedule": "cosine", "warmup_epochs": 1},
        {"arch": "vit", "dataset": "digits", "arch_args": TINY | {"patch_size": 2}, "epochs": 3, "batch_size": 32,
         "lr": 3e-3, "optimizer": "adamw"},
    ]
    path = write_spec(tmp / "s.yaml", name="transformers", replicas=2, noise=["control"], workloads=workloads)
    assert sweep.main([str(path), "--out", str(tmp / "out")]) == 0
    return tmp / "out"


def runs_of(out) -> dict:
    df = store.read_runs(str(out)).to_pandas()
    return {d: g.sort_values("replica") for d, g in df.groupby("dataset")}


@pytest.mark.integration
def test_each_transformer_trains_and_control_replicas_are_bitwise_identical(transformers_out):
    runs = runs_of(transformers_out)
    assert set(runs) == {"modular_arithmetic", "text", "digits"}
    for dataset, g in runs.items():
        assert len(g) == 2 and (g.status == "ok").all(), g.error.tolist()
        assert g.weights_sha256.nunique() == 1 and len({tuple(p) for p in g.predictions}) == 1, dataset
        assert g.attention_backend.isin(["math", "flash"]).all() and g.attention_backend.nunique() == 1, dataset
    vocab = len(set(TEXT))
    text, vit = runs["text"].iloc[0], runs["digits"].iloc[0]
    assert text.test_accuracy > 5 / vocab and len(text.per_class_accuracy) == vocab  # per token
    assert vit.test_accuracy > 0.4  # 10 classes


@pytest.mark.integration
def test_predictions_are_the_evaluation_positions_and_labels_are_stored_once(transformers_out):
    """Modular arithmetic: one prediction per test pair, the label its answer (a + b) mod p, in
    (a, b) order. Text: one per position of the test windows, the label the next character."""
    fs, root = store.resolve(str(transformers_out))
    # one labels file per dataset definition (name, dataset_root, dataset_args)
    labels = {d: pq.read_table(next(Path(root, "datasets").glob(f"{d}*.parquet")), filesystem=fs)["label"].to_numpy()
              for d in ("modular_arithmetic", "text")}
    a, b = np.divmod(np.arange(P * P), P)
    train_pairs = set(np.random.default_rng(0).permutation(P * P)[:round(0.5 * P * P)])  # the loader's seed 0
    test_pairs = [i for i in range(P * P) if i not in train_pairs]
    assert labels["modular_arithmetic"].tolist() == ((a + b) % P)[test_pairs].tolist()
    chars = sorted(set(TEXT))
    split = int(len(TEXT) * 0.8)
    n = (len(TEXT) - split - 1) // 16 * 16  # positions in whole test windows
    assert labels["text"].tolist() == [chars.index(c) for c in TEXT[split + 1:split + 1 + n]]
    for dataset, g in runs_of(transformers_out).items():
        if dataset in labels:
            assert g.predictions.map(len).eq(len(labels[dataset])).all(), dataset


@pytest.mark.integration
def test_the_cosine_schedule_runs_as_configured(transformers_out):
    """2,160 training characters in 134 windows of 16, batch 16: 9 steps per epoch, 27 in all, the
    first 9 warming up linearly. Epoch starts: step 0 at lr/9; step 9, where the cosine starts, at
    lr; step 18, halfway through the cosine's 18 steps, at lr · (1 + cos(π/2))/2 = lr/2."""
    text = runs_of(transformers_out)["text"].iloc[0]
    steps = math.ceil(((int(len(TEXT) * 0.8) - 1) // 16) / 16)
    assert steps == 9 and list(text.epoch_lr) == pytest.approx([1e-2 / 9, 1e-2, 1e-2 / 2], rel=1e-9)
    assert list(runs_of(transformers_out)["digits"].iloc[0].epoch_lr) == [3e-3] * 3  # constant


@pytest.mark.integration
def test_the_tables_reduce_every_transformer(transformers_out):
    variance = reduce.reduce(str(transformers_out))["variance"]
    assert set(zip(variance.arch, variance.dataset)) == {("gpt", "modular_arithmetic"), ("gpt", "text"),
                                                         ("vit", "digits")}
    assert (variance.n_runs == 2).all() and (variance.identical_fraction == 1).all() and (variance.churn == 0).all()


@pytest.fixture(scope="module")
def kernels_out(ray_local, tmp_path_factory):
    """GPT on modular arithmetic under tooling.attention [math, flash, efficient] x eval_batch_size
    [null (the training batch, 16), 7]; control replicas, 2 each. A CPU offers no efficient kernel."""
    tmp = tmp_path_factory.mktemp("kernels")
    path = write_spec(tmp / "s.yaml", name="kernels", replicas=2, noise=["control"],
                      tooling={"attention": ["math", "flash", "efficient"], "eval_batch_size": [None, 7]},
                      workloads=[workload(dataset_args={"p": P, "train_fraction": 0.5}, arch_args=TINY, epochs=1,
                                          batch_size=16, lr=3e-3, optimizer="adamw")])
    assert sweep.main([str(path), "--out", str(tmp / "out")]) == 1  # the efficient runs fail
    return tmp / "out"


@pytest.mark.integration
def test_each_attention_kernel_is_its_own_group_and_reproducible(kernels_out):
    df = store.read_runs(str(kernels_out)).to_pandas()
    ok = df[df.status == "ok"]
    assert sorted(set(zip(ok.attention, ok.eval_batch_size))) == [("flash", 7), ("flash", 16), ("math", 7),
                                                                  ("math", 16)]
    for _, g in ok.groupby(["attention", "eval_batch_size"]):
        assert len(g) == 2 and g.weights_sha256.nunique() == 1 and len({tuple(p) for p in g.predictions}) == 1
    assert (ok.attention_backend == ok.attention).all()  # the kernel SDPA really ran is the one asked for
    # the evaluation batch changes nothing in training: same weights at both sizes
    assert ok.groupby("attention").weights_sha256.nunique().eq(1).all()


@pytest.mark.integration
def test_an_unavailable_kernel_fails_its_runs_in_one_line(kernels_out):
    df = store.read_runs(str(kernels_out)).to_pandas()
    bad = df[df.attention == "efficient"]
    assert len(bad) == 4 and (bad.status == "failed").all()
    assert all(e.startswith("AttentionUnavailable: attention: the efficient kernel is not available on cpu")
               and "\n" not in e for e in bad.error)


@pytest.mark.integration
def test_kernels_and_evaluation_batches_are_paired_in_cross_stack(kernels_out):
    cs = reduce.reduce(str(kernels_out))["cross_stack"]
    kernels = cs[(cs.attention_a != cs.attention_b) & (cs.eval_batch_size_a == cs.eval_batch_size_b)]
    assert sorted(zip(kernels.attention_a, kernels.attention_b, kernels.eval_batch_size_a)) == [
        ("flash", "math", 7), ("flash", "math", 16)]
    assert (kernels.n_pairs == 2).all()
    batches = cs[(cs.attention_a == cs.attention_b) & (cs.eval_batch_size_a != cs.eval_batch_size_b)]
    assert len(batches) == 2 and (batches.identical_fraction == 1).all()  # same weights, evaluated twice
