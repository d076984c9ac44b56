"""Image folders too large for memory: decoded batch by batch by DataLoader workers, every random
draw seeded per example from the run's generators, so control replicas are bitwise identical with
any num_workers. The tests write a tiny ImageNet-layout folder and train through the runner."""

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator import runner
from orchestrator.spec import SpecError, expand, parse
from workloads import data as datasets
from workloads.train import TrainConfig, eval_batches

CLASSES = ("n01", "n02", "n03")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """ROOT/{train,val}/<class>/: 8 train and 3 val images per class, JPEG and PNG, sizes vary;
    each class has its own mean colour so a small CNN can learn something in two epochs."""
    root = tmp_path_factory.mktemp("imagenet")
    g = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 3)):
        for c, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                h, w = 20 + i % 3, 24 - i % 4
                pixels = np.clip(g.normal(60 + 70 * c, 40, (h, w, 3)), 0, 255).astype(np.uint8)
                ext = "JPEG" if i % 2 else "png"
                Image.fromarray(pixels).save(root / split / name / f"{name}_{i}.{ext}")
    return root


def test_stream_keeps_file_lists_not_pixels(folder):
    d = datasets.load("imagenet", str(folder), image_size=16, stream=True, num_workers=2)
    assert isinstance(d, datasets.ImageFolders) and (len(d.train), len(d.test)) == (24, 9)
    assert d.num_classes == 3 and d.image_shape == (3, 16, 16) and d.test_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    with pytest.raises(ValueError, match="num_workers needs stream: true"):
        datasets.load("imagenet", str(folder), num_workers=2)


def test_an_example_s_draws_depend_on_its_seed_alone(folder):
    d = datasets.load("imagenet", str(folder), image_size=16, stream=True)
    images = datasets.DecodedImages(d.train, 16, "crop+flip")
    x, label = images[(5, 123)]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and label == 0
    assert torch.equal(images[(5, 123)][0], x) and not torch.equal(images[(5, 124)][0], x)
    state = torch.get_rng_state()
    images[(5, 99)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG (dropout's) is left alone
    plain = datasets.DecodedImages(d.test, 16)[0][0]
    assert plain.shape == (3, 16, 16) and torch.equal(plain, datasets.DecodedImages(d.test, 16)[0][0])


def test_streamed_evaluation_batches_follow_eval_batch_size(folder):
    """9 test images: batches of eval_batch_size, default the training batch size, in test order."""
    d = datasets.load("imagenet", str(folder), image_size=16, stream=True)
    for eval_batch_size, sizes in ((None, [8, 1]), (4, [4, 4, 1])):
        cfg = TrainConfig(epochs=1, batch_size=8, lr=0.1, eval_batch_size=eval_batch_size)
        batches = list(eval_batches(d, cfg, torch.device("cpu")))
        assert [len(y) for _, y in batches] == sizes and batches[0][0].shape[1:] == (3, 16, 16)
        assert torch.cat([y for _, y in batches]).tolist() == d.test_y.tolist()


def sweep_of(folder, noise, num_workers):
    return parse({"name": "stream", "replicas": 2, "noise": [noise], "workloads": [
        {"arch": "small_cnn", "dataset": "imagenet", "dataset_root": str(folder),
         "dataset_args": {"stream": True, "image_size": 16, "num_workers": num_workers},
         "epochs": 2, "batch_size": 8, "lr": 0.01, "augmentation": "crop+flip"}]})


@pytest.mark.integration
@pytest.mark.parametrize("num_workers", [0, 2])
def test_control_replicas_identical_algo_differ_with_workers(folder, tmp_path, torch_switches, num_workers):
    rows = {noise: [runner.run(r, str(tmp_path)) for r in expand(sweep_of(folder, noise, num_workers))]
            for noise in ("control", "algo")}
    assert all(r["status"] == "ok" for rs in rows.values() for r in rs), rows
    control, algo = rows["control"], rows["algo"]
    assert control[0]["weights_sha256"] == control[1]["weights_sha256"]
    assert control[0]["predictions"] == control[1]["predictions"] and len(control[0]["predictions"]) == 9
    assert algo[0]["weights_sha256"] != algo[1]["weights_sha256"]
    assert len(control[0]["epoch_seconds"]) == 2
    # test labels known without decoding, in a file keyed by the dataset's definition (root, args)
    assert len(list((tmp_path / "datasets").glob("imagenet-*.parquet"))) == 1


@pytest.mark.integration
def test_worker_count_does_not_change_the_bits(folder, tmp_path, torch_switches):
    digests = {w: runner.run(expand(sweep_of(folder, "control", w))[0], str(tmp_path / str(w)))["weights_sha256"]
               for w in (0, 2)}
    assert digests[0] == digests[2]


def test_a_streamed_workload_cannot_be_probed(folder):
    doc = sweep_of(folder, "control", 0).model_dump(mode="json", exclude_defaults=True) | {"overhead": {}}
    with pytest.raises(SpecError, match="^spec: overhead: the probe replays batches held in memory"):
        parse(doc)
