"""Datasets as tensors that fit in memory, so the training loop can keep them on the device, and
image folders that do not fit, read batch by batch.

Every loader returns an `ArrayDataset` with images in NCHW float32 (normalised with the train
split's per-channel mean/std) and int64 labels. No DataLoader and no worker processes: their seeding
would be one more noise source that no sweep setting controls. The exception is `imagenet(...,
stream=True)`: an `ImageFolders` of file lists, decoded by DataLoader workers (`DecodedImages`)
with every random draw seeded per example from the run's generators, so no worker RNG is involved.

Token datasets (`text`, `modular_arithmetic`, `synthetic_tokens`) return a `TokenDataset`: windows
of token ids for a next-token model, with a fixed, flat list of evaluation positions standing in for
test examples, so that predictions, churn and per-class (per-token) accuracy work as for images.

Loaders take `(root, **options)`. Nothing is ever downloaded: a real dataset must already be on disk
in the layout its loader documents, else the loader raises FileNotFoundError naming that layout.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import pickle
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset


@dataclass(frozen=True)
class ArrayDataset:
    """A train/test split held as tensors. `subgroups` (test set only) ids are optional."""

    train_x: torch.Tensor  # (N, C, H, W) float32, normalised
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    subgroups: torch.Tensor | None = None  # (N_test,) int64 subgroup id per test example
    subgroup_names: tuple[str, ...] = ()  # index = subgroup id

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    input_shape = image_shape  # what a model builder is given: (C, H, W) here, (T,) for tokens


def _normalise(train: np.ndarray, test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale both splits (NCHW, any numeric dtype) with the train split's per-channel mean/std.

    Works one channel at a time in float64 and writes float32, so the float64 working copy is one
    channel of one split, not the whole dataset (CIFAR-10 as one float64 array is 1.2 GB, and the
    arithmetic on it needs two more).
    """
    stats = [(train[:, c].mean(dtype=np.float64), train[:, c].std(dtype=np.float64) + 1e-8)
             for c in range(train.shape[1])]
    scaled = []
    for split in (train, test):
        out = np.empty(split.shape, dtype=np.float32)
        for c, (mean, std) in enumerate(stats):
            out[:, c] = (split[:, c].astype(np.float64) - mean) / std
        scaled.append(torch.from_numpy(out))
    return scaled[0], scaled[1]


def from_arrays(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                num_classes: int, **extra) -> ArrayDataset:
    """Build an ArrayDataset from NCHW arrays of any numeric dtype."""
    tx, vx = _normalise(train_x, test_x)
    return ArrayDataset(tx, torch.as_tensor(train_y, dtype=torch.int64), vx,
                        torch.as_tensor(test_y, dtype=torch.int64), num_classes, **extra)


def _require(root: str | Path | None, name: str, layout: str, entries: Sequence[str]) -> Path:
    """`Path(root)`, once every entry (file or folder, relative to root) is known to exist.

    Lists every missing entry at once, with the expected layout, because the fix is always the same:
    put the files there (no loader downloads anything).
    """
    if root is None:
        raise FileNotFoundError(f"dataset {name!r} needs a root directory laid out as: {layout}")
    base = Path(root)
    missing = [e for e in entries if not (base / e).exists()]
    if missing:
        raise FileNotFoundError(f"dataset {name!r}: missing {', '.join(missing)} under {base}; "
                                f"expected layout: {layout}. Nothing is downloaded: place the files there.")
    return base


DIGITS_SPLIT = Path(__file__).with_name("digits_split.txt")


def digits(root: str | None = None) -> ArrayDataset:
    """scikit-learn's bundled 8×8 digits (1,797 images, ships in the wheel: no download).

    Read from the wheel's CSV as `load_digits` reads it, without importing scikit-learn: that import
    (scipy.stats with it) cost every worker process ~1.9 s of its start. The split is fixed
    (stratified, 25% test, split seed 0) so that every replica and every machine sees the same test
    set; only the sweep's noise sources may differ between runs. Its indices, as
    `train_test_split(test_size=0.25, stratify=y, random_state=0)` gives them, are stored in
    digits_split.txt (train, then test; tests check them against scikit-learn), so the split does not
    move with the installed scikit-learn either.
    """
    csv = Path(importlib.util.find_spec("sklearn").origin).parent / "datasets" / "data" / "digits.csv.gz"
    data = np.loadtxt(csv, delimiter=",")
    x, y = data[:, :-1].reshape(-1, 1, 8, 8), data[:, -1].astype(np.int64)
    train, test = (np.array(line.split(), dtype=np.int64) for line in DIGITS_SPLIT.read_text().splitlines())
    return from_arrays(x[train], y[train], x[test], y[test], num_classes=10)


def synthetic(root: str | None = None, n_train: int = 512, n_test: int = 256, image_size: int = 32,
              channels: int = 3, num_classes: int = 10, noise: float = 1.0, seed: int = 0) -> ArrayDataset:
    """Generated images: a fixed random template per class plus Gaussian noise.

    Learnable but not trivially so; `seed` fixes the data itself (not a noise source of the sweep).
    """
    g = np.random.default_rng(seed)
    templates = g.normal(size=(num_classes, channels, image_size, image_size))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        return templates[y] + noise * g.normal(size=(n, channels, image_size, image_size)), y

    (tx, ty), (vx, vy) = draw(n_train), draw(n_test)
    return from_arrays(tx, ty, vx, vy, num_classes=num_classes)


# --- CIFAR -----------------------------------------------------------------------------------------

def _unpickle(path: Path) -> dict:
    """One file of the CIFAR "python version" (pickled by Python 2, hence latin1, as torchvision reads it)."""
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def _read_cifar_batches(base: Path, files: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate batches: each holds `data` (N, 3072) uint8, row = R, G, B planes of 32×32, which
    reshapes straight to NCHW; labels are `labels` (CIFAR-10) or `fine_labels` (CIFAR-100)."""
    entries = [_unpickle(base / f) for f in files]
    x = np.concatenate([e["data"] for e in entries]).reshape(-1, 3, 32, 32)
    y = np.concatenate([e["labels"] if "labels" in e else e["fine_labels"] for e in entries])
    return x, y


def _cifar(root: str | None, name: str, tv_class: type) -> ArrayDataset:
    """Read the pickle batches at exactly the paths torchvision's `tv_class` reads.

    Not `tv_class(root, download=False)` itself: it md5-checks every batch even when not downloading,
    so only the original archive's bytes would load — no re-packed subset, no test fixture. The file
    list and meta key come from `tv_class`, so the layout cannot drift from torchvision's.
    """
    train = [f for f, _md5 in tv_class.train_list]
    test = [f for f, _md5 in tv_class.test_list]
    meta = tv_class.meta["filename"]
    folder = tv_class.base_folder
    layout = f"ROOT/{folder}/{{{','.join(train + test + [meta])}}} (the extracted {tv_class.filename})"
    base = _require(root, name, layout, [f"{folder}/{f}" for f in train + test + [meta]]) / folder
    (tx, ty), (vx, vy) = _read_cifar_batches(base, train), _read_cifar_batches(base, test)
    num_classes = len(_unpickle(base / meta)[tv_class.meta["key"]])
    return from_arrays(tx, ty, vx, vy, num_classes=num_classes)


def cifar10(root: str | None) -> ArrayDataset:
    """CIFAR-10: 50,000 train / 10,000 test 32×32 RGB images, 10 classes."""
    from torchvision.datasets import CIFAR10

    return _cifar(root, "cifar10", CIFAR10)


def cifar100(root: str | None) -> ArrayDataset:
    """CIFAR-100 with its 100 fine labels: 50,000 train / 10,000 test 32×32 RGB images."""
    from torchvision.datasets import CIFAR100

    return _cifar(root, "cifar100", CIFAR100)


# --- image files (ImageNet, CelebA) ----------------------------------------------------------------

def _read_images(paths: Sequence[str | Path], image_size: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to `image_size`, centre-crop a square: (N, 3, S, S) uint8.

    Preallocated, so peak memory is the uint8 array plus one decoded image.
    """
    from PIL import Image
    from torchvision.transforms import functional as TF

    out = np.empty((len(paths), 3, image_size, image_size), dtype=np.uint8)
    for i, path in enumerate(paths):
        with Image.open(path) as img:
            img = TF.center_crop(TF.resize(img.convert("RGB"), image_size), image_size)
        out[i] = np.asarray(img).transpose(2, 0, 1)
    return out


def _cap_per_class(samples: list[tuple[str, int]], cap: int | None) -> list[tuple[str, int]]:
    """The first `cap` samples of each class, in the (sorted) order the folder scan returned them."""
    if cap is None:
        return samples
    seen: Counter[int] = Counter()
    kept = []
    for path, label in samples:
        if seen[label] < cap:
            kept.append((path, label))
            seen[label] += 1
    return kept


def _read_samples(samples: list[tuple[str, int]], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) for a list of (path, label) pairs."""
    return _read_images([p for p, _ in samples], image_size), np.array([y for _, y in samples])


IMAGENET_LAYOUT = ("ROOT/train/<class>/*.JPEG and ROOT/val/<class>/*.JPEG (ImageFolder trees with the "
                   "same class folder names; the official flat val/ folder must first be sorted into "
                   "class folders, e.g. with the usual valprep.sh)")


def imagenet(root: str | None, image_size: int = 64, max_per_class: int | None = None, stream: bool = False,
             num_workers: int = 0) -> ArrayDataset | ImageFolders:
    """ImageNet, or any ImageFolder pair of train/ and val/ trees (test split = val/).

    In memory (default): resized and centre-cropped to `image_size`. Full-resolution ImageNet does
    not fit (at 224×224 the train set is ~190 GB of uint8, 4× that as float32), hence the small
    default. `stream=True` keeps only the file lists and decodes batches as training reads them,
    with `num_workers` DataLoader processes: any size, e.g. the study's 224. `max_per_class`
    (applied to both splits, first files in sorted order) takes subsets. Class indices follow
    train/'s sorted folder names; val/ folders absent from train/ are ignored.
    """
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    if num_workers and not stream:
        raise ValueError("imagenet: num_workers needs stream: true (in-memory data has no DataLoader)")
    base = _require(root, "imagenet", IMAGENET_LAYOUT, ["train", "val"])
    train = ImageFolder(base / "train")
    train_samples = _cap_per_class(train.samples, max_per_class)
    test_samples = _cap_per_class(ImageFolder.make_dataset(base / "val", train.class_to_idx,
                                                           extensions=IMG_EXTENSIONS), max_per_class)
    if stream:
        return ImageFolders(tuple(train_samples), tuple(test_samples), len(train.classes), image_size, num_workers)
    tx, ty = _read_samples(train_samples, image_size)
    vx, vy = _read_samples(test_samples, image_size)
    return from_arrays(tx, ty, vx, vy, num_classes=len(train.classes))


# Per-channel mean/std of ImageNet's train split (RGB, [0, 1] scale): streamed folders cannot be
# scanned for their own statistics before training, so they use these, as torchvision's recipes do.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageFolders:
    """Train and test image files, decoded batch by batch by `num_workers` DataLoader processes."""

    train: tuple[tuple[str, int], ...]  # (path, label), folder-scan order
    test: tuple[tuple[str, int], ...]
    num_classes: int
    image_size: int
    num_workers: int = 0
    subgroups: torch.Tensor | None = None
    subgroup_names: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return 3, self.image_size, self.image_size

    input_shape = image_shape

    @property
    def test_y(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.test], dtype=torch.int64)


class DecodedImages(Dataset):
    """Image files decoded on access to normalised (3, S, S) float32 tensors.

    Training items are `(index, seed)` pairs: the seed alone draws that example's random-resized
    crop ("crop") and horizontal flip ("flip"), so the draws do not depend on which worker decodes
    it or how many workers there are. Test items are plain indices: resize to 8/7 S, centre-crop S.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], image_size: int, augmentation: str = "none"):
        self.samples, self.size, self.augmentation = samples, image_size, augmentation

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        from PIL import Image
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms import functional as TF

        index, seed = item if isinstance(item, tuple) else (item, None)
        path, label = self.samples[index]
        with Image.open(path) as img:
            img = img.convert("RGB")
        if seed is None:
            img = TF.center_crop(TF.resize(img, round(self.size * 8 / 7)), self.size)
        else:
            with torch.random.fork_rng(devices=[]):  # torchvision draws from the global RNG
                torch.manual_seed(seed)
                box = (RandomResizedCrop.get_params(img, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
                       if "crop" in self.augmentation else None)
                flip = "flip" in self.augmentation and bool(torch.rand(()) < 0.5)
            img = TF.resized_crop(img, *box, [self.size, self.size]) if box else \
                TF.center_crop(TF.resize(img, self.size), self.size)
            img = TF.hflip(img) if flip else img
        x = TF.pil_to_tensor(img).float().div_(255)
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD), label


CELEBA_FILES = ("celeba/list_attr_celeba.txt", "celeba/list_eval_partition.txt", "celeba/img_align_celeba")
CELEBA_LAYOUT = ("ROOT/celeba/list_attr_celeba.txt, ROOT/celeba/list_eval_partition.txt and "
                 "ROOT/celeba/img_align_celeba/<image>.jpg (torchvision's CelebA layout)")
CELEBA_TRAIN, CELEBA_TEST = 0, 2  # partition ids in list_eval_partition.txt (1 = valid, unused)


def _read_celeba_attrs(path: Path) -> tuple[list[str], list[str], np.ndarray]:
    """list_attr_celeba.txt: a count line, a line of attribute names, then `<image> v1 … v40` rows
    (space-padded, v in {-1, 1}). Returns (attribute names, image names, (N, 40) int64 in {0, 1})."""
    lines = path.read_text().splitlines()
    rows = [line.split() for line in lines[2:] if line.strip()]
    values = np.array([row[1:] for row in rows], dtype=np.int64)
    return lines[1].split(), [row[0] for row in rows], (values + 1) // 2


def _read_celeba_partition(path: Path) -> dict[str, int]:
    """list_eval_partition.txt: `<image> <partition>` rows, partition 0 train, 1 valid, 2 test."""
    return {name: int(part) for name, part in (line.split() for line in path.read_text().splitlines()
                                               if line.strip())}


def _attr_columns(names: list[str], attrs: Sequence[str]) -> list[int]:
    """Column of each attribute; every unknown or repeated name reported at once."""
    unknown = [a for a in attrs if a not in names]
    if unknown or len(set(attrs)) != len(attrs):
        raise ValueError(f"celeba: attributes {list(attrs)} must be distinct names among {names}; "
                         f"unknown: {unknown}")
    return [names.index(a) for a in attrs]


def _subgroups(values: np.ndarray, attrs: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Subgroup id = the binary attribute values read as a number, first attribute most significant;
    names spell each combination out, e.g. ids 0..3 = "Blond_Hair=0,Male=0" … "Blond_Hair=1,Male=1"."""
    weights = 2 ** np.arange(len(attrs) - 1, -1, -1)
    names = tuple(",".join(f"{a}={v}" for a, v in zip(attrs, combo))
                  for combo in itertools.product((0, 1), repeat=len(attrs)))
    return values @ weights, names


def celeba(root: str | None, target: str = "Blond_Hair", subgroup_attrs: Sequence[str] = ("Male",),
           image_size: int = 64) -> ArrayDataset:
    """CelebA as binary classification of `target`, with test subgroups = every combination of the
    target and `subgroup_attrs` (the default Blond_Hair × Male gives 4), so the reducer can report
    per-subgroup false positive/negative rates. Train = partition 0, test = partition 2.

    Reads the files torchvision's CelebA reads, but not through it: it md5-checks the annotation
    files even with download=False, so no subset or fixture could load. Only the attribute and
    partition lists are needed; identity, bbox and landmark files are not read.
    """
    base = _require(root, "celeba", CELEBA_LAYOUT, CELEBA_FILES) / "celeba"
    attrs = (target, *subgroup_attrs)
    names, images, values = _read_celeba_attrs(base / "list_attr_celeba.txt")
    values = values[:, _attr_columns(names, attrs)]  # (N, 1 + len(subgroup_attrs)), target first
    partition = _read_celeba_partition(base / "list_eval_partition.txt")
    split = np.array([partition[name] for name in images])
    paths = np.array([base / "img_align_celeba" / name for name in images], dtype=object)
    train, test = split == CELEBA_TRAIN, split == CELEBA_TEST
    subgroups, subgroup_names = _subgroups(values[test], attrs)
    return from_arrays(_read_images(paths[train], image_size), values[train, 0],
                       _read_images(paths[test], image_size), values[test, 0], num_classes=2,
                       subgroups=torch.as_tensor(subgroups, dtype=torch.int64),
                       subgroup_names=subgroup_names)


# --- token datasets -------------------------------------------------------------------------------

IGNORE = -100  # target of a position that is neither trained on nor evaluated (F.cross_entropy's ignore_index)


@dataclass(frozen=True)
class TokenDataset:
    """Token windows for a next-token model, shaped like an ArrayDataset so the same loop trains
    it: an example is a window of T tokens, its target the window shifted by one token. The test
    "examples" are the positions whose target is not IGNORE, in a fixed order (window by window,
    position by position): `test_y` lists their targets, and a run's predictions are the arg-max
    token at exactly those positions. `num_classes` is the vocabulary size."""

    train_x: torch.Tensor  # (N, T) int64 token ids
    train_y: torch.Tensor  # (N, T) int64 next token per position; IGNORE where no loss is taken
    test_x: torch.Tensor  # (M, T)
    test_targets: torch.Tensor  # (M, T); IGNORE at the positions not evaluated
    num_classes: int
    subgroups: torch.Tensor | None = None
    subgroup_names: tuple[str, ...] = ()

    @property
    def input_shape(self) -> tuple[int]:
        return (self.train_x.shape[1],)

    @property
    def test_y(self) -> torch.Tensor:
        """(K,) int64 targets of the evaluation positions."""
        return self.test_targets[self.test_targets != IGNORE]


def _windows(tokens: np.ndarray, context_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-overlapping windows of `tokens` (1-D) and their next tokens: two (N, T) int64 tensors,
    N = (len - 1) // T; a tail shorter than a window is dropped."""
    n = (len(tokens) - 1) // context_length
    x = tokens[:n * context_length].reshape(n, context_length)
    y = tokens[1:n * context_length + 1].reshape(n, context_length)
    return torch.as_tensor(x, dtype=torch.int64), torch.as_tensor(y, dtype=torch.int64)


def _tokenise(path: Path, level: str) -> tuple[np.ndarray, int]:
    """(token ids, vocabulary size): UTF-8 bytes (256), or characters numbered in code-point order
    over the whole file (the test split's characters are in the vocabulary too)."""
    raw = path.read_bytes()
    if level == "byte":
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int64), 256
    if level != "char":
        raise ValueError(f"text: level must be char or byte, got {level!r}")
    try:
        codes = np.frombuffer(raw.decode("utf-8").encode("utf-32-le"), dtype=np.uint32)
    except UnicodeDecodeError as e:
        raise ValueError(f"text: {path} is not UTF-8 (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "give a UTF-8 file or level: byte") from None
    vocab, ids = np.unique(codes, return_inverse=True)
    return ids, len(vocab)


def text(root: str | None, level: str = "char", context_length: int = 128, test_fraction: float = 0.1) -> TokenDataset:
    """A UTF-8 text file (`root` names the file) as a language-modelling task, at character or byte
    `level`. The first 1 - `test_fraction` of the tokens train and the rest test (split by position,
    so no window straddles both); each split is cut into non-overlapping windows of `context_length`
    tokens, and every position of every test window is evaluated (next-token accuracy and loss)."""
    if root is None or not Path(root).is_file():
        raise FileNotFoundError(f"dataset 'text' needs dataset_root naming a UTF-8 text file; got {root!r}")
    if not 0 < test_fraction < 1:
        raise ValueError(f"text: test_fraction must be in (0, 1), got {test_fraction}")
    tokens, vocab = _tokenise(Path(root), level)
    split = int(len(tokens) * (1 - test_fraction))
    (tx, ty), (vx, vy) = _windows(tokens[:split], context_length), _windows(tokens[split:], context_length)
    if not len(tx) or not len(vx):
        raise ValueError(f"text: {root} has {len(tokens)} {level} tokens, too few for a train and a test window "
                         f"of context_length {context_length} + 1 at test_fraction {test_fraction}; "
                         "give a longer file or a shorter context_length")
    return TokenDataset(tx, ty, vx, vy, num_classes=vocab)


def modular_arithmetic(root: str | None = None, p: int = 97, train_fraction: float = 0.5,
                       seed: int = 0) -> TokenDataset:
    """a + b mod p for every pair (a, b), the grokking task (Power et al. 2022): the sequence
    `a b =` (tokens 0..p-1, then `=` = token p; vocabulary p + 1) with the answer as the only
    target, at the `=` position. A `train_fraction` of the p² pairs, drawn with `seed` (the data
    itself, not a noise source), trains; the rest test, in (a, b) order."""
    if not 0 < round(train_fraction * p * p) < p * p:
        raise ValueError(f"modular_arithmetic: train_fraction {train_fraction} of {p * p} pairs leaves a split empty")
    a, b = np.divmod(np.arange(p * p), p)
    x = np.stack([a, b, np.full_like(a, p)], axis=1)  # (p², 3)
    y = np.full_like(x, IGNORE)
    y[:, -1] = (a + b) % p
    perm = np.random.default_rng(seed).permutation(p * p)
    n = round(train_fraction * p * p)
    train, test = np.sort(perm[:n]), np.sort(perm[n:])
    as_tensor = functools.partial(torch.as_tensor, dtype=torch.int64)
    return TokenDataset(as_tensor(x[train]), as_tensor(y[train]), as_tensor(x[test]), as_tensor(y[test]),
                        num_classes=p + 1)


def synthetic_tokens(root: str | None = None, n_train: int = 256, n_test: int = 16, context_length: int = 1024,
                     vocab_size: int = 256, seed: int = 0) -> TokenDataset:
    """Uniformly random token windows, for timing a language model where no text file exists (a
    GPU node of a cluster): what a step costs does not depend on the token values. Nothing to learn
    beyond chance; `seed` fixes the data."""
    g = np.random.default_rng(seed)
    (tx, ty), (vx, vy) = (_windows(g.integers(0, vocab_size, n * context_length + 1), context_length)
                          for n in (n_train, n_test))
    return TokenDataset(tx, ty, vx, vy, num_classes=vocab_size)


DATASETS: dict[str, Callable[..., ArrayDataset | ImageFolders | TokenDataset]] = {
    "digits": digits,
    "synthetic": synthetic,
    "cifar10": cifar10,
    "cifar100": cifar100,
    "imagenet": imagenet,
    "celeba": celeba,
    "text": text,
    "modular_arithmetic": modular_arithmetic,
    "synthetic_tokens": synthetic_tokens,
}
TOKEN_DATASETS = frozenset({"text", "modular_arithmetic", "synthetic_tokens"})  # give TokenDataset


def load(name: str, root: str | None = None, **options) -> ArrayDataset | ImageFolders | TokenDataset:
    """Load a registered dataset by name; `options` are the loader's keyword arguments."""
    return DATASETS[name](root, **options)
