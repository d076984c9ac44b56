"""Each real dataset loader reads tiny files written here in that dataset's on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from workloads.data import load

RNG_SEED = 1234


def _assert_normalised(x: torch.Tensor) -> None:
    """Train split: float32, per-channel mean ≈ 0 and std ≈ 1."""
    assert x.dtype == torch.float32
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(x.shape[1]), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(x.shape[1]), atol=1e-4)


def _expected(train: np.ndarray, split: np.ndarray) -> torch.Tensor:
    """`split` normalised with `train`'s per-channel statistics, computed independently of data.py."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True)
    std = train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return torch.from_numpy(((split - mean) / std).astype(np.float32))


# --- CIFAR: pickled dicts, `data` (N, 3072) uint8 rows of R, G, B planes -------------------------------

def _write_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)


def test_cifar10_reads_python_batches(tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    batches = {f"data_batch_{i}": (_images(rng, 3), rng.integers(0, 10, 3)) for i in range(1, 6)}
    batches["test_batch"] = (_images(rng, 4), rng.integers(0, 10, 4))
    for name, (x, y) in batches.items():
        _write_pickle(base / name, {"batch_label": name, "labels": y.tolist(), "data": x.reshape(len(x), -1),
                                    "filenames": [f"{name}_{i}.png" for i in range(len(x))]})
    _write_pickle(base / "batches.meta", {"label_names": [f"class{i}" for i in range(10)],
                                          "num_cases_per_batch": 3, "num_vis": 3072})

    ds = load("cifar10", str(tmp_path))

    train_x = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    train_y = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert ds.train_x.shape == (15, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.train_y.dtype == ds.test_y.dtype == torch.int64
    assert ds.train_y.tolist() == train_y.tolist()
    assert ds.test_y.tolist() == batches["test_batch"][1].tolist()
    assert ds.num_classes == 10 and ds.subgroups is None
    _assert_normalised(ds.train_x)
    torch.testing.assert_close(ds.train_x, _expected(train_x, train_x))
    torch.testing.assert_close(ds.test_x, _expected(train_x, batches["test_batch"][0]))


def test_cifar100_uses_fine_labels(tmp_path):
    rng = np.random.default_rng(RNG_SEED)
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    splits = {"train": (_images(rng, 6), np.array([0, 99, 42, 7, 7, 63])),
              "test": (_images(rng, 3), np.array([99, 1, 50]))}
    for name, (x, fine) in splits.items():
        _write_pickle(base / name, {"filenames": [f"{i}.png" for i in range(len(x))], "batch_label": name,
                                    "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist(),
                                    "data": x.reshape(len(x), -1)})
    _write_pickle(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)],
                                  "coarse_label_names": [f"coarse{i}" for i in range(20)]})

    ds = load("cifar100", str(tmp_path))

    assert ds.num_classes == 100
    assert ds.train_y.tolist() == splits["train"][1].tolist()
    assert ds.test_y.tolist() == splits["test"][1].tolist()
    assert ds.image_shape == (3, 32, 32)
    _assert_normalised(ds.train_x)
    torch.testing.assert_close(ds.test_x, _expected(splits["train"][0], splits["test"][0]))


# --- ImageNet: ImageFolder trees ------------------------------------------------------------------------

COLOURS = {"n01440764": (255, 0, 0), "n01443537": (0, 255, 0), "n01484850": (0, 0, 255)}  # sorted = label


def _write_class_images(folder: Path, colour: tuple[int, int, int], n: int, suffix: str = ".png") -> None:
    """`n` solid-colour 12×10 (W×H, not square: exercises resize + centre-crop) images."""
    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (12, 10), colour).save(folder / f"img{i}{suffix}")


@pytest.fixture
def imagefolder(tmp_path) -> Path:
    for label, (name, colour) in enumerate(COLOURS.items()):
        _write_class_images(tmp_path / "train" / name, colour, 3 + label)
        _write_class_images(tmp_path / "val" / name, colour, 2)
    # ImageNet's own files end in upper-case .JPEG.
    jpeg = tmp_path / "train" / "n01440764" / "extra.JPEG"
    Image.new("RGB", (12, 10), COLOURS["n01440764"]).save(jpeg, format="JPEG")
    _write_class_images(tmp_path / "val" / "n99999999", (9, 9, 9), 1)  # not a train class: ignored
    return tmp_path


def test_imagenet_reads_imagefolder_tree(imagefolder):
    ds = load("imagenet", str(imagefolder), image_size=8)

    assert ds.num_classes == 3
    assert ds.train_x.shape == (4 + 4 + 5, 3, 8, 8) and ds.test_x.shape == (6, 3, 8, 8)
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 5
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]
    _assert_normalised(ds.train_x)
    # Solid colours stay solid through resize and crop: each class is one constant image, and the
    # strongest channel after normalisation is the class's colour channel.
    assert torch.equal(ds.test_x[0], ds.test_x[1])
    assert ds.test_x[:, :, 0, 0].argmax(dim=1).tolist() == ds.test_y.tolist()


def test_imagenet_caps_images_per_class(imagefolder):
    ds = load("imagenet", str(imagefolder), image_size=8, max_per_class=1)

    assert ds.train_y.tolist() == [0, 1, 2] and ds.test_y.tolist() == [0, 1, 2]


# --- CelebA: annotation text files + img_align_celeba/ ---------------------------------------------------

CELEBA_ATTRS = """5_o_Clock_Shadow Arched_Eyebrows Attractive Bags_Under_Eyes Bald Bangs Big_Lips
Big_Nose Black_Hair Blond_Hair Blurry Brown_Hair Bushy_Eyebrows Chubby Double_Chin Eyeglasses Goatee
Gray_Hair Heavy_Makeup High_Cheekbones Male Mouth_Slightly_Open Mustache Narrow_Eyes No_Beard Oval_Face
Pale_Skin Pointy_Nose Receding_Hairline Rosy_Cheeks Sideburns Smiling Straight_Hair Wavy_Hair
Wearing_Earrings Wearing_Hat Wearing_Lipstick Wearing_Necklace Wearing_Necktie Young""".split()
PARTITIONS = [0, 0, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2]  # train, valid (not loaded), test


@pytest.fixture
def celeba_root(tmp_path) -> tuple[Path, list[str], np.ndarray]:
    """A CelebA tree in torchvision's layout: 13 images with random {0, 1} attributes."""
    rng = np.random.default_rng(RNG_SEED)
    base = tmp_path / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    names = [f"{i:06d}.jpg" for i in range(1, len(PARTITIONS) + 1)]
    attrs = rng.integers(0, 2, size=(len(names), len(CELEBA_ATTRS)))
    # Every Blond_Hair × Male combination occurs in the test partition.
    test_rows = [i for i, p in enumerate(PARTITIONS) if p == 2]
    attrs[test_rows[:4], CELEBA_ATTRS.index("Blond_Hair")] = [0, 0, 1, 1]
    attrs[test_rows[:4], CELEBA_ATTRS.index("Male")] = [0, 1, 0, 1]
    rows = [f"{name} " + " ".join(f"{2 * v - 1:2d}" for v in row) for name, row in zip(names, attrs)]
    # A count line, then the names with a trailing space, as in the original file.
    header = f"{len(names)}\n" + " ".join(CELEBA_ATTRS) + " \n"
    (base / "list_attr_celeba.txt").write_text(header + "\n".join(rows) + "\n")
    partition = "".join(f"{name} {p}\n" for name, p in zip(names, PARTITIONS))
    (base / "list_eval_partition.txt").write_text(partition)
    for name in names:
        pixels = rng.integers(0, 256, size=(24, 20, 3), dtype=np.uint8)  # H×W, portrait like CelebA
        Image.fromarray(pixels).save(base / "img_align_celeba" / name, format="JPEG")
    return tmp_path, names, attrs


def test_celeba_target_and_subgroups(celeba_root):
    root, _, attrs = celeba_root
    blond, male = attrs[:, CELEBA_ATTRS.index("Blond_Hair")], attrs[:, CELEBA_ATTRS.index("Male")]
    train, test = np.array(PARTITIONS) == 0, np.array(PARTITIONS) == 2

    ds = load("celeba", str(root), image_size=8)

    assert ds.num_classes == 2
    assert ds.train_x.shape == (6, 3, 8, 8) and ds.test_x.shape == (5, 3, 8, 8)
    assert ds.train_y.tolist() == blond[train].tolist() and ds.test_y.tolist() == blond[test].tolist()
    assert ds.subgroups.dtype == torch.int64
    assert ds.subgroups.tolist() == (2 * blond[test] + male[test]).tolist()
    assert ds.subgroup_names == ("Blond_Hair=0,Male=0", "Blond_Hair=0,Male=1",
                                 "Blond_Hair=1,Male=0", "Blond_Hair=1,Male=1")
    _assert_normalised(ds.train_x)


def test_celeba_other_target_and_two_subgroup_attributes(celeba_root):
    root, _, attrs = celeba_root
    test = np.array(PARTITIONS) == 2
    smiling, male, young = (attrs[test, CELEBA_ATTRS.index(a)] for a in ("Smiling", "Male", "Young"))

    ds = load("celeba", str(root), target="Smiling", subgroup_attrs=["Male", "Young"], image_size=8)

    assert ds.test_y.tolist() == smiling.tolist()
    assert ds.subgroups.tolist() == (4 * smiling + 2 * male + young).tolist()
    assert len(ds.subgroup_names) == 8 and ds.subgroup_names[5] == "Smiling=1,Male=0,Young=1"


def test_celeba_rejects_unknown_attribute(celeba_root):
    with pytest.raises(ValueError, match="Blond"):
        load("celeba", str(celeba_root[0]), subgroup_attrs=["Blond"], image_size=8)


# --- missing files ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, expected", [("cifar10", "cifar-10-batches-py/data_batch_1"),
                                            ("cifar100", "cifar-100-python/train"),
                                            ("imagenet", "train"),
                                            ("celeba", "celeba/list_attr_celeba.txt")])
def test_missing_files_name_root_and_layout(tmp_path, name, expected):
    with pytest.raises(FileNotFoundError, match="expected layout") as error:
        load(name, str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in str(error.value) and expected in str(error.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "imagenet", "celeba"])
def test_missing_root_is_reported(name):
    with pytest.raises(FileNotFoundError, match="needs a root"):
        load(name)


# --- token datasets: windows of token ids, evaluation positions as the test "examples" -------------

TEXT = "Der Bär aß Äpfel. " * 40  # 18 characters, 13 distinct (three outside ASCII), repeated: 720


def test_text_char_level_windows_split_by_position(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ds = load("text", str(path), context_length=16, test_fraction=0.25)
    chars = sorted(set(TEXT))
    ids = np.array([chars.index(c) for c in TEXT])
    split = int(len(TEXT) * 0.75)  # 540: the first 540 characters train, the last 180 test
    assert ds.num_classes == len(chars) == 13 and ds.input_shape == (16,)
    assert ds.train_x.dtype == ds.train_y.dtype == torch.int64
    assert ds.train_x.shape == ((split - 1) // 16, 16) and ds.test_x.shape == ((180 - 1) // 16, 16)
    assert ds.train_x.flatten().tolist() == ids[:len(ds.train_x) * 16].tolist()
    assert torch.equal(ds.train_y[:, :-1], ds.train_x[:, 1:])  # next token per position
    assert ds.train_y[-1, -1] == ids[len(ds.train_x) * 16]
    assert ds.test_x.flatten().tolist() == ids[split:split + ds.test_x.numel()].tolist()
    # every position of every test window is evaluated, window by window
    assert ds.test_y.tolist() == ids[split + 1:split + 1 + ds.test_x.numel()].tolist()


def test_text_byte_level_reads_utf8_bytes(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    ds = load("text", str(path), level="byte", context_length=8)
    raw = TEXT.encode("utf-8")
    assert ds.num_classes == 256 and len(raw) > len(TEXT)  # ä, ß, Ä take two bytes each
    assert ds.train_x.flatten().tolist() == list(raw[:ds.train_x.numel()])


def test_text_refuses_what_it_cannot_read(tmp_path):
    with pytest.raises(FileNotFoundError, match="needs dataset_root naming a UTF-8 text file"):
        load("text", str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes("Bär".encode("latin-1") * 100)
    with pytest.raises(ValueError, match=r"is not UTF-8 \(byte 0xe4 at offset 1\); give a UTF-8 file or level: byte"):
        load("text", str(tmp_path / "latin1.txt"))
    (tmp_path / "short.txt").write_text("abc" * 10)
    with pytest.raises(ValueError, match="too few for a train and a test window"):
        load("text", str(tmp_path / "short.txt"), context_length=16)


def test_modular_arithmetic_defaults_cover_every_pair_once():
    """`dataset: modular_arithmetic` alone: p = 97, half the pairs train. Each window is `a b =`, the
    one target is (a + b) mod p at the `=` position, and the test positions are exactly those."""
    ds = load("modular_arithmetic")
    p = 97
    x = torch.cat([ds.train_x, ds.test_x])
    assert ds.num_classes == p + 1 and ds.input_shape == (3,) and len(ds.train_x) == round(p * p / 2)
    assert sorted((x[:, 0] * p + x[:, 1]).tolist()) == list(range(p * p)) and (x[:, 2] == p).all()
    for inputs, targets in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_targets)):
        assert (targets[:, :2] == -100).all() and torch.equal(targets[:, 2], (inputs[:, 0] + inputs[:, 1]) % p)
    assert torch.equal(ds.test_y, (ds.test_x[:, 0] + ds.test_x[:, 1]) % p)
    pairs = (ds.test_x[:, 0] * p + ds.test_x[:, 1]).tolist()
    assert pairs == sorted(pairs)  # test positions in (a, b) order
    other = load("modular_arithmetic", p=7, train_fraction=0.3, seed=1)
    assert len(other.train_x) == round(0.3 * 49) and len(other.test_y) == 49 - len(other.train_x)
    with pytest.raises(ValueError, match="leaves a split empty"):
        load("modular_arithmetic", p=7, train_fraction=1.0)


def test_synthetic_tokens_are_fixed_by_their_seed():
    a, b, c = (load("synthetic_tokens", n_train=4, n_test=2, context_length=32, vocab_size=50, seed=s)
               for s in (0, 0, 1))
    assert a.train_x.shape == (4, 32) and a.test_y.shape == (64,) and a.num_classes == 50
    assert torch.equal(a.train_x, b.train_x) and not torch.equal(a.train_x, c.train_x)
    assert torch.equal(a.train_y[:, :-1], a.train_x[:, 1:]) and int(a.train_x.max()) < 50


def test_digits_is_scikit_learns_split_read_without_importing_it():
    """The stored split is the one train_test_split gives, and a worker that loads digits never
    imports scikit-learn (~1.9 s of its start)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    tx, vx, ty, vy = train_test_split(x.reshape(-1, 1, 8, 8), y, test_size=0.25, stratify=y, random_state=0)
    got = load("digits")
    assert torch.equal(got.train_y, torch.from_numpy(ty)) and torch.equal(got.test_y, torch.from_numpy(vy))
    torch.testing.assert_close(got.train_x, _expected(tx, tx), rtol=0, atol=0)
    torch.testing.assert_close(got.test_x, _expected(tx, vx), rtol=0, atol=0)
    code = "import sys; from workloads.data import load; load('digits'); print('sklearn' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False"
