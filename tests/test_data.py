"""Few-shot image data: the task sampler, Digits, the Omniglot reader (on a tiny archive made
here, and on the real one when it is beside the checkout), image folders, the cache."""
from __future__ import annotations

import io
import os
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

import fastmeta
from fastmeta.data import (ClassDataset, DataError, Digits, ImageFolderTasks, Omniglot,
                           TaskSampler, split_classes)
from fastmeta.data import images as image_helpers

PIL = pytest.importorskip("PIL.Image")

REAL_OMNIGLOT = Path(os.environ.get("FASTMETA_DATA") or
                     Path(__file__).resolve().parents[2] / "shared" / "data" / "omniglot")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test caches decoded images in its own folder (the real-data tests below use
    the user's cache instead, so the real archives are decoded once per machine)."""
    monkeypatch.setenv("FASTMETA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FASTMETA_DATA", raising=False)


# ---------------------------------------------------------------------------------------------
# Helpers: a tiny Omniglot in the standard layout
# ---------------------------------------------------------------------------------------------
SIDE = 12


def stroke_image(character: int, drawer: int) -> np.ndarray:
    """A 1-bit 12x12 image, black (0) strokes on white (1), unique per (character, drawer):
    a vertical bar at column ``character`` and a single dot at row ``drawer``, column 11."""
    image = np.ones((SIDE, SIDE), dtype=bool)
    image[2:10, character % SIDE] = False
    image[drawer % SIDE, SIDE - 1] = False
    return image


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    PIL.fromarray(array).convert("1").save(buffer, format="PNG")
    return buffer.getvalue()


# alphabet -> number of characters; names sort so "Beta" comes after "Alpha", and the
# characters' numbers must sort numerically (character2 < character10)
TINY = {"background": {"Beta_(script)": 2, "Alpha": 3}, "evaluation": {"Gamma": 2, "Delta": 1}}
DRAWERS = 4


def tiny_entries(part: str):
    """``(path inside the zip, array, (global character index, drawer))`` in the reader's
    documented order."""
    offset = 0 if part == "background" else sum(TINY["background"].values())
    entries, index = [], offset
    for alphabet in sorted(TINY[part]):
        count = TINY[part][alphabet]
        numbers = [1, 2, 10][:count] if count == 3 else list(range(1, count + 1))
        for number in numbers:
            for drawer in range(1, DRAWERS + 1):
                path = f"images_{part}/{alphabet}/character{number}/{index:04d}_{drawer:02d}.png"
                entries.append((path, stroke_image(index, drawer), (index, drawer)))
            index += 1
    return entries


def make_zip(folder: Path, part: str, shuffle: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    entries = tiny_entries(part)
    if shuffle:  # the reader must not depend on the order inside the archive
        entries = [entries[i] for i in np.random.RandomState(0).permutation(len(entries))]
    path = folder / f"images_{part}.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, array, _ in entries:
            archive.writestr(name, png_bytes(array))
    return path


@pytest.fixture
def tiny_root(tmp_path) -> Path:
    root = tmp_path / "omniglot"
    for part in ("background", "evaluation"):
        make_zip(root, part)
    return root


def expected_strokes(part: str) -> np.ndarray:
    """The tiny archive's images as the reader should give them at native size: [n, 12, 12],
    strokes 1.0, background 0.0, in the documented order."""
    return np.stack([(~a).astype(np.float32) for _, a, _ in tiny_entries(part)])


# ---------------------------------------------------------------------------------------------
# TaskSampler
# ---------------------------------------------------------------------------------------------
def uneven_dataset() -> ClassDataset:
    """Classes of 3, 5, 7, 4, 6 images; each image's pixels encode its index."""
    sizes = [3, 5, 7, 4, 6]
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(sizes)])
    labels = labels[torch.randperm(len(labels))]
    pixels = torch.arange(len(labels), dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 1, 2, 2)
    return ClassDataset(pixels.contiguous(), labels)


@pytest.fixture(scope="module")
def digits_train() -> Digits:
    return Digits("train")


def test_sampler_shapes_labels_and_balance(digits_train):
    sampler = TaskSampler(digits_train, n_way=5, k_shot=3, q_queries=4, meta_batch=6, seed=1)
    batch = sampler.sample()
    assert isinstance(batch, fastmeta.data.FewShotTasks)
    sx, sy, qx, qy = batch
    assert sx.shape == (6, 15, 1, 8, 8) and qx.shape == (6, 20, 1, 8, 8)
    assert sx.dtype == qx.dtype == torch.float32
    assert sy.dtype == qy.dtype == torch.int64
    assert sy.shape == (6, 15) and qy.shape == (6, 20)
    for t in range(6):
        assert torch.equal(torch.bincount(sy[t], minlength=5), torch.full((5,), 3))
        assert torch.equal(torch.bincount(qy[t], minlength=5), torch.full((5,), 4))
    assert int(sy.min()) == 0 and int(sy.max()) == 4


def test_sampler_images_match_their_labels_and_sets_are_disjoint(digits_train):
    sampler = TaskSampler(digits_train, n_way=5, k_shot=2, q_queries=5, meta_batch=8, seed=3)
    sx, sy, qx, qy = sampler.sample()
    classes = sampler.last_classes                              # [T, N] dataset class ids
    support, query = sampler.last_indices
    assert classes.shape == (8, 5)
    for t in range(8):
        assert len(set(classes[t].tolist())) == 5               # distinct classes per task
        s_idx, q_idx = support[t].tolist(), query[t].tolist()
        assert len(set(s_idx)) == len(s_idx) and len(set(q_idx)) == len(q_idx)
        assert not set(s_idx) & set(q_idx), "a query image is also in the support set"
        # label j means dataset class classes[t, j], for every support and query image
        assert torch.equal(digits_train.labels[support[t]], classes[t][sy[t]])
        assert torch.equal(digits_train.labels[query[t]], classes[t][qy[t]])
        assert torch.equal(sx[t], digits_train.images[support[t]])
        assert torch.equal(qx[t], digits_train.images[query[t]])


def test_sampler_label_permutation_and_coverage(digits_train):
    # n_way=5 of 24 classes takes the rejection path, n_way=20 the random-key path
    for n_way in (5, 20):
        sampler = TaskSampler(digits_train, n_way=n_way, k_shot=1, q_queries=1, meta_batch=200, seed=0)
        sampler.sample()
        classes = sampler.last_classes
        assert torch.equal(torch.unique(classes), torch.arange(24))   # every class gets drawn
        assert len(torch.unique(classes[:, 0])) > 10                  # label 0 is not always one class
        counts = torch.bincount(classes.flatten(), minlength=24).float()
        expected = 200 * n_way / 24
        assert float((counts - expected).abs().max()) < 6 * expected ** 0.5


def test_sampler_uneven_classes_never_pick_padding():
    dataset = uneven_dataset()
    sampler = TaskSampler(dataset, n_way=5, k_shot=1, q_queries=2, meta_batch=50, seed=0)
    for _ in range(5):
        sx, sy, qx, qy = sampler.sample()
        support, query = sampler.last_indices
        assert int(support.min()) >= 0 and int(query.min()) >= 0
        both = torch.cat([support, query], 1)
        for row in both.tolist():
            assert len(set(row)) == len(row)
        assert torch.equal(sx[:, :, 0, 0, 0].long(), support)      # pixels encode the index
        assert torch.equal(dataset.labels[support], sampler.last_classes.gather(1, sy))


def test_sampler_reproducible_and_resumable(digits_train):
    def draw(sampler, n):
        return [sampler.sample() for _ in range(n)]

    a = draw(TaskSampler(digits_train, 5, 1, 5, 4, seed=7), 3)
    b = draw(TaskSampler(digits_train, 5, 1, 5, 4, seed=7), 3)
    c = draw(TaskSampler(digits_train, 5, 1, 5, 4, seed=8), 3)
    for x, y in zip(a, b):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert not all(torch.equal(u, v) for u, v in zip(a[0], c[0]))

    sampler = TaskSampler(digits_train, 5, 1, 5, 4, seed=7)
    sampler.sample()
    state = sampler.state()
    continued = draw(sampler, 2)
    resumed = TaskSampler(digits_train, 5, 1, 5, 4, seed=123)
    resumed.load_state(state)
    for x, y in zip(continued, draw(resumed, 2)):
        assert all(torch.equal(u, v) for u, v in zip(x, y))
    assert all(torch.equal(u, v) for u, v in zip(continued[0], a[1]))


def test_sampler_state_survives_a_checkpoint_round_trip(digits_train, tmp_path):
    sampler = TaskSampler(digits_train, 5, 1, 5, 2, seed=0)
    torch.save({"sampler": sampler.state()}, tmp_path / "s.pt")
    expected = sampler.sample()
    other = TaskSampler(digits_train, 5, 1, 5, 2, seed=99)
    other.load_state(torch.load(tmp_path / "s.pt", weights_only=True)["sampler"])
    assert all(torch.equal(u, v) for u, v in zip(other.sample(), expected))


def test_sampler_load_state_rejects_foreign_states(digits_train):
    sampler = TaskSampler(digits_train, 5, 1, 5, 2)
    with pytest.raises(ValueError, match="not a TaskSampler state"):
        sampler.load_state(torch.zeros(3))
    other = TaskSampler(digits_train, 10, 1, 5, 2)
    with pytest.raises(ValueError, match="n_way=10"):
        sampler.load_state(other.state())
    # Tampered entries: clear ValueErrors, and the sampler keeps its stream.
    expected = TaskSampler(digits_train, 5, 1, 5, 2).sample()
    for key, junk, match in (("rng", "junk", "generator state"),
                             ("rng", torch.zeros(3, dtype=torch.uint8), "generator state"),
                             ("rng", sampler.state()["rng"].float(), "generator state"),
                             ("n_way", torch.tensor([5, 5]), "n_way=tensor"),
                             ("k_shot", 1.0, "k_shot=1.0")):
        with pytest.raises(ValueError, match=match):
            sampler.load_state({**sampler.state(), key: junk})
    assert all(torch.equal(u, v) for u, v in zip(sampler.sample(), expected))


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1])
def test_sampler_seed_out_of_generator_range(digits_train, seed):
    with pytest.raises(ValueError, match="seed must lie in"):
        TaskSampler(digits_train, 5, 1, 5, 2, seed=seed)


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 25}, "n_way=25 is more than the dataset's 24 classes"),
    ({"k_shot": 100, "q_queries": 100}, "k_shot \\+ q_queries = 200 images per class"),
    ({"n_way": 0}, "n_way must be a positive integer"),
    ({"k_shot": -1}, "k_shot must be a positive integer"),
    ({"q_queries": 0}, "q_queries must be a positive integer"),
    ({"meta_batch": 0}, "meta_batch must be a positive integer"),
    ({"n_way": 2.5}, "n_way must be a positive integer"),
    ({"k_shot": True}, "k_shot must be a positive integer"),
])
def test_sampler_argument_errors(digits_train, kwargs, match):
    arguments = {"n_way": 5, "k_shot": 1, "q_queries": 5, "meta_batch": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        TaskSampler(digits_train, **arguments)


def test_sampler_other_errors(digits_train):
    with pytest.raises(TypeError, match="class dataset"):
        TaskSampler(object(), 5, 1, 1, 1)
    with pytest.raises(TypeError, match="dtype"):
        TaskSampler(digits_train, 5, 1, 1, 1, dtype=torch.int64)
    with pytest.raises(ValueError, match="meta_batch"):
        TaskSampler(digits_train, 5, 1, 1, 1).sample(meta_batch=0)


def test_sampler_accepts_any_dataset_with_images_and_labels():
    images = torch.rand(30, 1, 4, 4, dtype=torch.float64)
    labels = torch.arange(30) % 6
    dataset = types.SimpleNamespace(images=images, labels=labels, num_classes=6)
    sampler = TaskSampler(dataset, 3, 2, 3, 4, dtype=torch.float64)
    sx, sy, qx, qy = sampler.sample(meta_batch=2)
    assert sx.shape == (2, 6, 1, 4, 4) and sx.dtype == torch.float64
    support, _ = sampler.last_indices
    assert torch.equal(sx, images[support])
    assert torch.equal(labels[support], sampler.last_classes.gather(1, sy))


def test_sampler_iterates_and_feeds_maml(digits_train):
    model = fastmeta.models.mlp([64, 16, 5])
    sampler = TaskSampler(digits_train, 5, 1, 2, 3)
    batch = next(iter(sampler))
    sx, sy, qx, qy = (t.flatten(2) if t.is_floating_point() else t for t in batch)
    maml = fastmeta.MAML(model, inner_lr=0.1, loss="cross_entropy")
    loss = maml(sx, sy, qx, qy)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------
# ClassDataset and split_classes
# ---------------------------------------------------------------------------------------------
def test_class_table_and_indices_of():
    dataset = uneven_dataset()
    table, counts = dataset.class_table()
    assert counts.tolist() == [3, 5, 7, 4, 6] and table.shape == (5, 7)
    for c in range(5):
        indices = dataset.indices_of(c)
        assert torch.equal(indices, (dataset.labels == c).nonzero().flatten())
        assert torch.equal(table[c, :counts[c]], indices)
        assert bool((table[c, counts[c]:] == -1).all())
    with pytest.raises(ValueError, match="cls"):
        dataset.indices_of(5)


def test_class_dataset_validation():
    with pytest.raises(ValueError, match="class 1 has no images"):
        ClassDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 0, 2, 2]))
    with pytest.raises(ValueError, match="N, C, H, W"):
        ClassDataset(torch.zeros(4, 2, 2), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="labels must have shape"):
        ClassDataset(torch.zeros(4, 1, 2, 2), torch.tensor([0, 1]))


def test_uint8_pixels_read_as_unit_range():
    pixels = torch.tensor([0, 51, 255, 255], dtype=torch.uint8).reshape(4, 1, 1, 1)
    dataset = ClassDataset(pixels, torch.tensor([0, 0, 1, 1]))
    assert dataset.images.dtype == torch.float32
    assert torch.allclose(dataset.images.flatten(), torch.tensor([0.0, 0.2, 1.0, 1.0]))
    sampler = TaskSampler(dataset, 2, 1, 1, 3)
    sx, _, qx, _ = sampler.sample()
    support, query = sampler.last_indices
    assert torch.equal(sx.flatten(1), dataset.images.flatten()[support])


def test_split_classes_keeps_groups_together(digits_train):
    train, val = split_classes(digits_train, 2, seed=0)
    assert (train.num_classes, val.num_classes) == (16, 8)
    assert len(train) + len(val) == len(digits_train)
    assert not set(train.groups.tolist()) & set(val.groups.tolist())
    assert len(set(val.groups.tolist())) == 2
    assert set(train.class_names) | set(val.class_names) == set(digits_train.class_names)
    again, _ = split_classes(digits_train, 2, seed=0)
    assert again.class_names == train.class_names
    # class names follow their images: every val image equals its source image
    first = val.class_names[0]
    source = digits_train.class_names.index(first)
    assert torch.equal(val.images[val.indices_of(0)], digits_train.images[digits_train.indices_of(source)])
    with pytest.raises(ValueError, match="at least one group on each side"):
        split_classes(digits_train, 6)
    assert split_classes(digits_train, 0.5)[1].num_classes == 12


# ---------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------
def test_digits_splits_and_shapes(digits_train):
    test = Digits("test")
    assert digits_train.num_classes == 24 and test.num_classes == 16
    assert digits_train.images.shape[1:] == (1, 8, 8) and digits_train.images.dtype == torch.float32
    assert len(digits_train) + len(test) == 4 * 1797
    assert float(digits_train.images.min()) == 0.0 and float(digits_train.images.max()) == 1.0
    assert digits_train.labels.dtype == torch.int64
    assert torch.equal(torch.unique(test.labels), torch.arange(16))
    assert digits_train.class_names[:5] == ["0/rot0", "0/rot90", "0/rot180", "0/rot270", "1/rot0"]
    assert test.class_names[0] == "6/rot0" and set(test.groups.tolist()) == {6, 7, 8, 9}
    with pytest.raises(ValueError, match="split must be one of"):
        Digits("val")


def test_digits_rotations_are_rotated_copies():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    test = Digits("test")
    for i, digit in enumerate((6, 7, 8, 9)):
        original = torch.from_numpy(bunch.images[bunch.target == digit].astype(np.float32) / 16)
        for r in range(4):
            images = test.images[test.indices_of(4 * i + r)][:, 0]
            assert torch.equal(images, torch.rot90(original, r, dims=(1, 2)))
    # a 90-degree rotation is counter-clockwise: the top row becomes the left column
    base, turned = test.images[test.indices_of(0)][0, 0], test.images[test.indices_of(1)][0, 0]
    assert torch.equal(turned[:, 0], base[0].flip(0))


# ---------------------------------------------------------------------------------------------
# Omniglot on a tiny archive
# ---------------------------------------------------------------------------------------------
def test_omniglot_lake_reads_the_standard_layout(tiny_root):
    background = Omniglot(tiny_root, "background", image_size=None)
    assert background.protocol == "lake" and background.rotations == (0,)
    assert background.num_classes == 5 and len(background) == 5 * DRAWERS
    assert background.images.shape == (20, 1, SIDE, SIDE)
    # documented order: alphabets by name, characters by number (character2 < character10)
    assert background.characters == ["Alpha/character1", "Alpha/character2", "Alpha/character10",
                                      "Beta_(script)/character1", "Beta_(script)/character2"]
    expected = torch.from_numpy(expected_strokes("background"))
    assert torch.equal(background.images[:, 0], expected)          # strokes 1, background 0
    assert torch.equal(background.labels, torch.arange(5).repeat_interleave(DRAWERS))
    evaluation = Omniglot(tiny_root, "test", protocol="lake", image_size=None)
    assert evaluation.num_classes == 3 and evaluation.characters[0] == "Delta/character1"
    assert torch.equal(evaluation.images[:, 0], torch.from_numpy(expected_strokes("evaluation")))


def test_omniglot_other_than_the_published_archives_is_named(tiny_root):
    with pytest.warns(UserWarning, match=r"images_background.zip holds \d+ characters of \d+ "
                                         r"drawings, the standard images_background 964 of 20"):
        Omniglot(tiny_root, "background")


def test_omniglot_vinyals_split_and_rotations(tiny_root):
    train = Omniglot(tiny_root, "train", image_size=None, train_characters=6)
    test = Omniglot(tiny_root, "test", image_size=None, train_characters=6)
    assert train.protocol == "vinyals" and (train.num_classes, test.num_classes) == (24, 8)
    assert train.characters[-1] == "Delta/character1" and test.characters == ["Gamma/character1",
                                                                             "Gamma/character2"]
    assert train.class_names[:2] == ["Alpha/character1/rot0", "Alpha/character1/rot90"]
    assert torch.equal(train.groups, torch.arange(6).repeat_interleave(4))
    for c in range(0, 24, 4):
        base = train.images[train.indices_of(c)]
        for r in range(1, 4):
            assert torch.equal(train.images[train.indices_of(c + r)], torch.rot90(base, r, dims=(2, 3)))
    sampler = TaskSampler(train, 5, 1, 3, 2)
    assert sampler.sample().support_x.shape == (2, 5, 1, SIDE, SIDE)
    with pytest.raises(DataError, match="too few"):
        Omniglot(tiny_root, "train", image_size=None)          # 8 characters < 1200


def test_omniglot_resizes_with_antialiasing(tiny_root):
    data = Omniglot(tiny_root, "background", image_size=6, resample="box")
    assert data.images.shape == (20, 1, 6, 6)
    native = torch.from_numpy(expected_strokes("background"))[:, None]
    box = torch.nn.functional.avg_pool2d(native, 2)                 # 12 -> 6 is an exact 2x2 box
    assert torch.allclose(data.images, box, atol=1 / 255 + 1e-6)
    assert bool(((data.images > 0) & (data.images < 1)).any())      # grey edges: antialiased


def test_omniglot_reads_unpacked_folders_and_root_from_env(tiny_root, tmp_path, monkeypatch):
    folders = tmp_path / "data"
    for part in ("background", "evaluation"):
        with zipfile.ZipFile(tiny_root / f"images_{part}.zip") as archive:
            archive.extractall(folders / "omniglot")   # -> data/omniglot/images_<part>/...
    monkeypatch.setenv("FASTMETA_DATA", str(folders))              # the parent of omniglot/
    from_folders = Omniglot(split="background", image_size=None)
    from_zip = Omniglot(tiny_root, split="background", image_size=None)
    assert torch.equal(from_folders.pixels, from_zip.pixels)
    assert from_folders.characters == from_zip.characters
    assert str(folders / "omniglot" / "images_background") in from_folders.sources[0]


def test_omniglot_caches_decoded_pixels(tiny_root, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = Omniglot(tiny_root, "background", image_size=8)
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(image_helpers, "_decode_chunk", fail)
    monkeypatch.setattr("fastmeta.data.omniglot.decode_images", fail)
    second = Omniglot(tiny_root, "background", image_size=8)
    assert torch.equal(first.pixels, second.pixels) and first.characters == second.characters
    # a different size, or a changed archive, is a different cache entry
    with pytest.raises(AssertionError, match="decoded again"):
        Omniglot(tiny_root, "background", image_size=9)
    archive = tiny_root / "images_background.zip"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        Omniglot(tiny_root, "background", image_size=8)


def test_omniglot_rebuilds_a_damaged_cache(tiny_root, tmp_path):
    first = Omniglot(tiny_root, "background", image_size=8)
    for path in (tmp_path / "cache").glob("*.npy"):
        path.write_bytes(b"garbage")
    again = Omniglot(tiny_root, "background", image_size=8)
    assert torch.equal(first.pixels, again.pixels)
    uncached = Omniglot(tiny_root, "background", image_size=8, cache=False)
    assert torch.equal(first.pixels, uncached.pixels)


@pytest.mark.parametrize("meta", [b"[1, 2, 3]", b"null", b'{"key": 5}'])
def test_omniglot_rebuilds_a_cache_whose_record_is_not_one(tiny_root, tmp_path, meta):
    first = Omniglot(tiny_root, "background", image_size=8)
    for path in (tmp_path / "cache").glob("*.json"):
        path.write_bytes(meta)
    assert torch.equal(first.pixels, Omniglot(tiny_root, "background", image_size=8).pixels)


@pytest.mark.parametrize("meta", [{}, None, {"characters": ["one"]}, {"characters": [1, 2]}])
def test_omniglot_rebuilds_a_cache_whose_meta_does_not_fit(tiny_root, tmp_path, meta):
    import json

    first = Omniglot(tiny_root, "background", image_size=8)
    for path in (tmp_path / "cache").glob("*.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "meta": meta}))
    again = Omniglot(tiny_root, "background", image_size=8)
    assert torch.equal(first.pixels, again.pixels) and again.characters == first.characters


def test_omniglot_decompression_bomb_names_the_member(tmp_path, monkeypatch):
    from PIL import Image

    make_zip(tmp_path, "background")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 16)  # every image is a "bomb" now
    with pytest.raises(DataError, match=r"cannot decode the image .*\.png: .*decompression bomb"):
        Omniglot(tmp_path, "background", image_size=8, cache=False, workers=1)


def test_omniglot_decodes_in_a_process_pool(tiny_root, monkeypatch):
    serial = Omniglot(tiny_root, "background", image_size=8, cache=False, workers=1)
    monkeypatch.setattr(image_helpers, "POOL_MIN_IMAGES", 1)
    pooled = Omniglot(tiny_root, "background", image_size=8, cache=False, workers=2)
    assert torch.equal(serial.pixels, pooled.pixels)


def test_omniglot_missing_data_gives_one_clear_error(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match=f"no Omniglot data at {missing}: the path does not exist") as info:
        Omniglot(missing)
    assert "FASTMETA_DATA" in str(info.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="expected images_background.zip and images_evaluation.zip "
                                        r"\(or the folders they unpack to\); set FASTMETA_DATA"):
        Omniglot(empty)
    with pytest.raises(DataError, match="pass root="):
        Omniglot()                                                 # no root and no FASTMETA_DATA
    assert issubclass(DataError, ValueError)


def test_omniglot_one_archive_is_enough_for_its_lake_split(tmp_path):
    make_zip(tmp_path, "background")
    assert Omniglot(tmp_path, "background", image_size=None).num_classes == 5
    with pytest.raises(DataError, match="expected images_evaluation.zip"):
        Omniglot(tmp_path, "evaluation")
    with pytest.raises(DataError, match="expected images_evaluation.zip"):
        Omniglot(tmp_path, "train")                                # vinyals needs both


def test_omniglot_corrupt_zip_names_the_file(tmp_path):
    (tmp_path / "images_background.zip").write_bytes(b"this is not a zip archive" * 10)
    with pytest.raises(DataError, match="images_background.zip is not a readable zip archive"):
        Omniglot(tmp_path, "background")


def test_omniglot_corrupt_png_names_the_member(tmp_path, monkeypatch):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("images_background/A/character01/0001_01.png", png_bytes(stroke_image(0, 1)))
        archive.writestr("images_background/A/character01/0001_02.png", b"\x89PNG broken")
    with pytest.raises(DataError, match=r"images_background.zip:images_background/A/character01/0001_02.png"):
        Omniglot(tmp_path, "background")
    monkeypatch.setattr(image_helpers, "POOL_MIN_IMAGES", 1)       # and from a pool worker
    with pytest.raises(DataError, match="0001_02.png"):
        Omniglot(tmp_path, "background", workers=2)


def test_omniglot_zip_without_images_or_uneven(tmp_path):
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as archive:
        archive.writestr("images_background/readme.txt", "nothing here")
    with pytest.raises(DataError, match="holds no Omniglot images"):
        Omniglot(tmp_path, "background")


def test_omniglot_argument_errors(tiny_root):
    with pytest.raises(ValueError, match="split must be one of"):
        Omniglot(tiny_root, "validation")
    with pytest.raises(ValueError, match="protocol must be one of"):
        Omniglot(tiny_root, "train", protocol="maml")
    with pytest.raises(ValueError, match="belongs to protocol='lake'"):
        Omniglot(tiny_root, "background", protocol="vinyals")
    with pytest.raises(ValueError, match="image_size"):
        Omniglot(tiny_root, "background", image_size=0)
    with pytest.raises(ValueError, match="rotations"):
        Omniglot(tiny_root, "background", rotations=(0, 45))
    with pytest.raises(ValueError, match="resample"):
        Omniglot(tiny_root, "background", resample="cubic")


# ---------------------------------------------------------------------------------------------
# ImageFolderTasks
# ---------------------------------------------------------------------------------------------
def write_folder(root: Path, sizes=((6, 6), (6, 6), (6, 6))):
    colours = {"cat": 10, "dog": 100, "eel": 200}
    for c, (name, value) in enumerate(colours.items()):
        folder = root / name / ("nested" if name == "eel" else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(3 + c):
            array = np.full(sizes[c], value + i, dtype=np.uint8)
            PIL.fromarray(array).save(folder / f"img{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    return colours


def test_image_folder_tasks(tmp_path):
    colours = write_folder(tmp_path / "imgs")
    data = ImageFolderTasks(tmp_path / "imgs")
    assert data.class_names == ["cat", "dog", "eel"]
    assert data.num_classes == 3 and len(data) == 3 + 4 + 5
    assert data.images.shape == (12, 1, 6, 6)
    for c, value in enumerate(colours.values()):
        values = sorted(int(v) for v in data.pixels[data.indices_of(c)][:, 0, 0, 0])
        assert values == list(range(value, value + 3 + c))
    rgb = ImageFolderTasks(tmp_path / "imgs", image_size=(4, 5), grayscale=False)
    assert rgb.images.shape == (12, 3, 4, 5)
    inverted = ImageFolderTasks(tmp_path / "imgs", invert=True)
    assert torch.equal(inverted.pixels, 255 - data.pixels)
    sx, sy, qx, qy = TaskSampler(data, 3, 1, 2, 2).sample()
    assert sx.shape == (2, 3, 1, 6, 6)


def test_image_folder_errors(tmp_path):
    write_folder(tmp_path / "mixed", sizes=((6, 6), (7, 6), (6, 6)))
    with pytest.raises(DataError, match="pass image_size="):
        ImageFolderTasks(tmp_path / "mixed")
    assert ImageFolderTasks(tmp_path / "mixed", image_size=5).images.shape == (12, 1, 5, 5)
    with pytest.raises(DataError, match="no image folder at"):
        ImageFolderTasks(tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="no class sub-folders"):
        ImageFolderTasks(tmp_path / "flat")
    (tmp_path / "flat" / "empty_class").mkdir()
    with pytest.raises(DataError, match="empty_class holds no images"):
        ImageFolderTasks(tmp_path / "flat")


def test_omniglot_corrupt_deflate_stream_names_the_member(tmp_path):
    path = tmp_path / "images_background.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for drawer in (1, 2):
            archive.writestr(f"images_background/A/character01/0001_0{drawer}.png",
                             png_bytes(stroke_image(0, drawer)))
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        info = archive.infolist()[1]
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start:start + 8] = b"\xff" * 8   # the member's deflate stream, not its headers
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="0001_02.png"):
        Omniglot(tmp_path, "background", cache=False)


def _save(path: Path, image) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def test_images_decode_as_a_viewer_shows_them(tmp_path):
    ramp = np.linspace(0, 65535, 16).astype(np.uint16)[None].repeat(2, 0)
    deep = _save(tmp_path / "deep.png", PIL.fromarray(ramp))
    ink = np.zeros((2, 4, 4), np.uint8)
    ink[1][:, 1:3] = 255                  # black strokes drawn by alpha alone
    alpha = _save(tmp_path / "alpha.png", PIL.fromarray(np.stack([ink[0]] * 3 + [ink[1]], -1)))
    tall = PIL.fromarray(np.arange(32, dtype=np.uint8).reshape(8, 4))
    exif = tall.getexif()
    exif[image_helpers.ORIENTATION_TAG] = 6   # rotate 90 degrees clockwise to display
    rotated = tmp_path / "rotated.png"
    tall.save(rotated, exif=exif)
    decode = image_helpers.decode_images
    assert decode([str(deep)], workers=1)[0, 0].tolist() == np.linspace(0, 255, 16).round().tolist()
    assert decode([str(alpha)], workers=1)[0, 0].tolist() == [255, 0, 0, 255]
    assert decode([str(rotated)], workers=1).shape == (1, 4, 8)
    for mode, values in (("I", np.arange(4, dtype=np.int32)), ("F", np.linspace(0, 1, 4, dtype=np.float32))):
        path = _save(tmp_path / f"{mode}.tif", PIL.fromarray(values.reshape(2, 2)))
        with pytest.raises(DataError, match=f"{mode}.tif: its pixels are"):
            decode([str(path)], workers=1)


def test_image_folder_odd_names_links_and_extensions(tmp_path):
    root = tmp_path / "odd"
    for name in ("²", "1²2", "b"):     # "²" is a digit to str.isdigit, but not to int()
        for i in range(2):
            _save(root / name / f"x{i}.png", PIL.fromarray(np.full((3, 3), i, np.uint8)))
    os.mkdir(os.path.join(os.fsencode(root), b"\xff-bytes"))
    _save(Path(os.fsdecode(os.path.join(os.fsencode(root), b"\xff-bytes"))) / "y.png",
          PIL.fromarray(np.zeros((3, 3), np.uint8)))
    data = ImageFolderTasks(root, cache=False)
    assert sorted(data.class_names) == sorted(["²", "1²2", "b", "\ufffd-bytes"])
    for name in data.class_names:
        name.encode("utf-8")           # printable and plottable
    os.symlink(tmp_path / "nowhere.png", root / "b" / "broken.png")
    with pytest.raises(DataError, match="broken.png"):
        ImageFolderTasks(root, cache=False)
    for bad in ((1,), ("png",), ()):
        with pytest.raises(TypeError, match="extensions"):
            ImageFolderTasks(root, extensions=bad, cache=False)


# ---------------------------------------------------------------------------------------------
# The real Omniglot, when it is beside the checkout (or at $FASTMETA_DATA)
# ---------------------------------------------------------------------------------------------
real = pytest.mark.skipif(not REAL_OMNIGLOT.is_dir(), reason=f"no Omniglot at {REAL_OMNIGLOT}")


@pytest.fixture(scope="module")
def real_omniglot():
    """The four real splits. Module-scoped, so they load before the per-test private cache is
    set: they use the user's cache (decoding the real archives takes seconds, once)."""
    return {split: Omniglot(REAL_OMNIGLOT, split)
            for split in ("train", "test", "background", "evaluation")}


@real
def test_real_omniglot_vinyals(real_omniglot):
    train, test = real_omniglot["train"], real_omniglot["test"]
    assert (train.num_classes, test.num_classes) == (4800, 1692)
    assert (len(train), len(test)) == (4800 * 20, 1692 * 20)
    assert train.images.shape[1:] == (1, 28, 28) and train.pixels.dtype == torch.uint8
    assert bool((train.class_sizes == 20).all()) and bool((test.class_sizes == 20).all())
    assert len(train.characters) == 1200 and len(test.characters) == 423
    assert train.characters[0] == "Alphabet_of_the_Magi/character01"
    assert train.characters[963] == "Tifinagh/character55"             # the last background one
    assert test.characters[-1] == "ULOG/character26"
    images = test.images
    assert float(images.min()) == 0.0 and float(images.max()) == 1.0
    assert 0.03 < float(images.mean()) < 0.2                           # sparse strokes, as 1
    assert float(images[:, :, 0, :].mean()) < 0.05                     # borders are background


@real
def test_real_omniglot_lake(real_omniglot):
    background, evaluation = real_omniglot["background"], real_omniglot["evaluation"]
    assert (background.num_classes, evaluation.num_classes) == (964, 659)
    assert bool((background.class_sizes == 20).all()) and len(evaluation) == 659 * 20
    assert len(set(c.split("/")[0] for c in background.characters)) == 30
    assert len(set(c.split("/")[0] for c in evaluation.characters)) == 20
    # lake's background characters are vinyals' first 964, unrotated
    train = real_omniglot["train"]
    assert torch.equal(background.pixels[:20], train.pixels[:20])


@real
def test_real_omniglot_sampler(real_omniglot):
    train = real_omniglot["train"]
    sampler = TaskSampler(train, 20, 1, 15, 4)
    sx, sy, qx, qy = sampler.sample()
    assert sx.shape == (4, 20, 1, 28, 28) and qx.shape == (4, 300, 1, 28, 28)
    support, query = sampler.last_indices
    assert torch.equal(sx, train.images[support])


def test_sinusoid_checks_its_arguments():
    tasks = fastmeta.data.Sinusoid(5, 5)
    for bad in (-1, 0, 2.5, True):
        with pytest.raises(ValueError, match="k_shot must be a positive integer"):
            tasks.sample(2, k_shot=bad)
        with pytest.raises(ValueError, match="q_query must be a positive integer"):
            tasks.sample(2, q_query=bad)
    with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
        fastmeta.data.Sinusoid(dtype=torch.int64)
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\^63\)"):
        fastmeta.data.Sinusoid(seed=2 ** 64)


def test_image_folder_takes_one_extension_as_a_string(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        for i in range(2):
            (tmp_path / name / f"{i}.png").write_bytes(png_bytes(stroke_image(i, 1)))
        (tmp_path / name / "notes.log").write_text("not an image")  # ends in "g", not ".png"
    data = ImageFolderTasks(tmp_path, extensions=".png", image_size=8, cache=False)
    assert data.num_classes == 2 and len(data) == 4
