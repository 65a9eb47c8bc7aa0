"""Tests for torch_dmc.data.imagenet: ImageNet-C / Tiny-ImageNet-C trees and image folders.

The trees are real JPEG (and PNG) files written with Pillow in the real layout, small enough to
decode in milliseconds. Each image is one solid colour that encodes where it lies (corruption,
severity, class, index), so a test can check that every row decodes to the right file.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import pytest

from torch_dmc.data.imagenet import (
    ImageFiles,
    ImageNetC,
    digest_entries,
    open_imagefolder,
    open_imagenet_c,
    read_image_ids,
    subset_rows,
)
from torch_dmc.data.sources import SubsetSet

Image = pytest.importorskip("PIL.Image")  # decoding needs Pillow (no core dependency)

# written in an order that is not the sorted one: labels must follow the sorted wnids
WNIDS = ("n01484850", "n01440764", "n01443537")
SORTED_WNIDS = sorted(WNIDS)
CORRS = ("fog", "gaussian_noise")  # standard order: gaussian_noise first
SEVS = (2, 5)
# the files of every class folder: sorted order differs from this one; one PNG, one .jpg
NAMES = ("ILSVRC2012_val_00000300.JPEG", "ILSVRC2012_val_00000100.jpg", "ILSVRC2012_val_00000200.png")


def colour(corruption: str, severity: int, wnid: str, name: str) -> tuple[int, int, int]:
    """The solid colour of one image: R by class, G by file, B by (corruption, severity)."""
    ci, si = CORRS.index(corruption), SEVS.index(severity)
    return (30 + 60 * SORTED_WNIDS.index(wnid), 30 + 50 * sorted(NAMES).index(name), 20 + 50 * ci + 100 * si)


def write_image(path: Path, rgb, size: int | tuple[int, int]) -> None:
    w, h = (size, size) if isinstance(size, int) else size
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", (w, h), tuple(rgb))
    if path.suffix.lower() == ".png":
        img.save(path, format="PNG")
    else:
        img.save(path, format="JPEG", quality=95)


def make_tree(root: Path, size: int = 16, corrs=CORRS, sevs=SEVS, wnids=WNIDS, names=NAMES,
              group: str | None = None) -> Path:
    """An ImageNet-C tree ``root/[group/]<corruption>/<severity>/<wnid>/<name>``, plus clutter."""
    for c in corrs:
        for s in sevs:
            for w in wnids:
                for n in names:
                    base = root / group if group else root
                    write_image(base / c / str(s) / w / n, colour(c, s, w, n), size)
    (root / "README.txt").write_text("not a folder\n")
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")  # a subset of the classes: all listed
    (root / "not_a_corruption" / "5").mkdir(parents=True)
    base = root / group if group else root
    (base / corrs[0] / str(sevs[0]) / wnids[0] / "Thumbs.db").write_bytes(b"\0\1")  # not an image
    (base / corrs[0] / str(sevs[0]) / ".hidden").mkdir()  # hidden folders are no classes
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return make_tree(tmp_path_factory.mktemp("imagenet-c"))


def expected_ids() -> list[str]:
    return [f"{w}/{n}" for w in SORTED_WNIDS for n in sorted(NAMES)]


def check_colours(x: np.ndarray, corruption: str, severity: int, ids: list[str], tol: float = 6.0):
    assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[-1] == 3
    for img, i in zip(x, ids, strict=True):
        w, n = i.split("/")
        want = np.array(colour(corruption, severity, w, n), float)
        got = img.reshape(-1, 3).mean(0)
        assert np.abs(got - want).max() < tol, (i, got, want)


def one_line_error(fn, *culprits: str) -> str:
    with pytest.raises(ValueError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for c in culprits:
        assert c in msg, (c, msg)
    return msg


# ---------------------------------------------------------------------------------------------
# ImageNet-C layout
# ---------------------------------------------------------------------------------------------


def test_layout_classes_labels_and_pixels(tree):
    data = open_imagenet_c(tree, size=16)
    assert isinstance(data, ImageNetC)
    assert data.corruptions() == ["gaussian_noise", "fog"]  # standard order, clutter ignored
    assert data.spec == f"imagenet-c:{tree}"
    assert data.num_classes == 3 and data.classes == SORTED_WNIDS
    assert data.preprocessing == {"decode": "Pillow, RGB", "resize": None, "crop": None, "size": 16}
    assert data.describe()["num_classes"] == 3
    assert data.ids == expected_ids() and data.reference == ("gaussian_noise", 2)
    s = data.corrupted("fog", 5)
    assert isinstance(s, ImageFiles) and len(s) == 9
    assert s.ids == expected_ids()
    assert s.labels.dtype == np.int64 and s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s.paths[0] == str(tree / "fog" / "5" / "n01440764" / "ILSVRC2012_val_00000100.jpg")
    x = s.read(np.arange(9))
    assert x.shape == (9, 16, 16, 3)
    check_colours(x, "fog", 5, s.ids)
    # any order, repeats allowed
    rows = np.array([7, 7, 0, 4])
    check_colours(s.read(rows), "fog", 5, [s.ids[r] for r in rows])
    check_colours(data.corrupted("gaussian_noise", 2).read(np.arange(9)), "gaussian_noise", 2, s.ids)
    assert s.read(np.zeros(0, np.int64)).shape == (0, 16, 16, 3)


def test_workers_give_the_same_batches_in_order_and_files_digests(tree):
    data = open_imagenet_c(tree, size=16)
    batches = [np.array([4, 0]), np.array([8]), np.array([1, 2, 3, 5, 6, 7]), np.array([], int),
               np.array([4])]
    s0, s2 = data.corrupted("gaussian_noise", 5), data.corrupted("gaussian_noise", 5)
    assert s0.files() == {} and s0.read_counts == {}
    a = list(s0.iter_batches(batches, workers=0))
    b = list(s2.iter_batches(batches, workers=2))
    assert [x.shape for x in b] == [(k, 16, 16, 3) for k in (2, 1, 6, 0, 1)]
    for x, y, rows in zip(a, b, batches, strict=True):
        assert x.dtype == y.dtype == np.uint8
        np.testing.assert_array_equal(x, y)
        check_colours(y, "gaussian_noise", 5, [s0.ids[r] for r in rows])
    # files(): SHA-256 over sorted (id, sha256(file bytes)) pairs, as documented
    folder = tree / "gaussian_noise" / "5"
    h = hashlib.sha256()
    for i in sorted(s0.ids):
        h.update(i.encode() + b"\0" + hashlib.sha256((folder / i).read_bytes()).digest())
    assert s0.files() == s2.files() == {"gaussian_noise/5": h.hexdigest()}
    assert s0.read_counts == s2.read_counts == {"gaussian_noise/5": 9}
    # only what was read counts
    s1 = data.corrupted("fog", 2)
    list(s1.iter_batches([np.array([3, 1])], workers=0))
    pairs = [(s1.ids[r], hashlib.sha256(Path(s1.paths[r]).read_bytes()).digest()) for r in (1, 3)]
    assert s1.files() == {"fog/2": digest_entries(pairs)} and s1.read_counts == {"fog/2": 2}
    # a subset reads through the base set's workers
    sub = SubsetSet(data.corrupted("fog", 2), [8, 0])
    (x,) = sub.iter_batches([np.array([1, 0])], workers=2)
    check_colours(x, "fog", 2, [s1.ids[0], s1.ids[8]])


def test_workers_stop_when_the_consumer_stops(tree):
    s = open_imagenet_c(tree, size=16).corrupted("fog", 2)
    gen = s.iter_batches([np.array([r]) for r in range(9)], workers=2)
    assert next(gen).shape == (1, 16, 16, 3)
    gen.close()  # shuts the workers down; nothing hangs
    assert s.read_counts == {"fog/2": 1}


def test_grouped_layout_and_tiny(tmp_path):
    root = make_tree(tmp_path / "grouped", corrs=("gaussian_noise",), sevs=(5,), wnids=WNIDS[:2],
                     names=NAMES[:1], group="noise")
    data = open_imagenet_c(root, size=16)
    assert data.corruptions() == ["gaussian_noise"]
    s = data.corrupted("gaussian_noise", 5)
    assert s.ids == ["n01440764/ILSVRC2012_val_00000300.JPEG", "n01484850/ILSVRC2012_val_00000300.JPEG"]
    tiny = make_tree(tmp_path / "tiny", size=64, corrs=("fog",), sevs=(2,), wnids=WNIDS[:2],
                     names=NAMES[:1])
    data = open_imagenet_c(tiny, tiny=True)
    assert data.spec == f"tiny-imagenet-c:{tiny}" and data.size == 64
    assert data.preprocessing["size"] == 64 and data.num_classes == 2
    assert data.corrupted("fog", 2).read(np.arange(2)).shape == (2, 64, 64, 3)
    assert open_imagenet_c(tiny).preprocessing["size"] == 224


def test_select_rows_ids_and_subsets(tree, tmp_path):
    data = open_imagenet_c(tree, size=16)
    assert data.select(None) is None
    np.testing.assert_array_equal(data.select(4), subset_rows(9, 4, 0))
    np.testing.assert_array_equal(data.select(100), np.arange(9))
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("# chosen images\n\nn01484850/ILSVRC2012_val_00000100.jpg\n"
                        "  ./n01440764/ILSVRC2012_val_00000300.JPEG  \n# end\n")
    ids = read_image_ids(ids_file)
    assert ids == ["n01484850/ILSVRC2012_val_00000100.jpg", "./n01440764/ILSVRC2012_val_00000300.JPEG"]
    assert data.select(None, ids).tolist() == [6, 2]
    assert data.select(1, ids).tolist() == [6]
    rows = data.select(None, ids)
    s = SubsetSet(data.corrupted("fog", 5), rows)
    check_colours(s.read(np.arange(2)), "fog", 5, ["n01484850/ILSVRC2012_val_00000100.jpg",
                                                   "n01440764/ILSVRC2012_val_00000300.JPEG"])


def test_subset_rows_is_the_fit_subset_rule():
    from torch_dmc.bench.runner import fit_subset

    for n_total, n, seed in [(10, None, 0), (10, 3, 0), (10, 3, 7), (10, 10, 1), (10, 20, 0), (1000, 17, 3)]:
        np.testing.assert_array_equal(subset_rows(n_total, n, seed), fit_subset(n_total, n, seed))
    assert subset_rows(50, 5, 0).tolist() == np.sort(np.random.default_rng(0).permutation(50)[:5]).tolist()


# ---------------------------------------------------------------------------------------------
# errors: one line, naming the culprit
# ---------------------------------------------------------------------------------------------


@pytest.fixture()
def small(tmp_path) -> Path:
    return make_tree(tmp_path / "c", wnids=WNIDS[:2], names=NAMES[:2])


def test_error_empty_class_folder(small):
    folder = small / "fog" / "5" / "n01484850"
    for f in folder.iterdir():
        f.unlink()
    one_line_error(lambda: open_imagenet_c(small, size=16).corrupted("fog", 5), str(folder), "no images")


def test_error_missing_severity(small):
    data = open_imagenet_c(small, size=16)
    one_line_error(lambda: data.corrupted("fog", 3), str(small / "fog" / "3"), "2, 5")
    one_line_error(lambda: data.corrupted("fog", 6), "severity 6", "1..5")


def test_error_unknown_or_absent_corruption(small):
    data = open_imagenet_c(small, size=16)
    one_line_error(lambda: data.corrupted("sharpness", 5), "'sharpness'", "gaussian_noise")
    one_line_error(lambda: data.corrupted("snow", 5), str(small / "snow"), "gaussian_noise, fog")


def test_error_different_wnids_across_folders(small):
    (small / "fog" / "5" / "n01484850").rename(small / "fog" / "5" / "n09999999")
    one_line_error(lambda: open_imagenet_c(small, size=16).corrupted("fog", 5),
                   str(small / "fog" / "5"), "n01484850", "n09999999")


def test_error_different_files_across_folders(small):
    old = small / "fog" / "2" / "n01440764" / NAMES[0]
    old.rename(old.with_name("ILSVRC2012_val_00000999.JPEG"))
    one_line_error(lambda: open_imagenet_c(small, size=16).corrupted("fog", 2),
                   str(small / "fog" / "2"), "n01440764/ILSVRC2012_val_00000999.JPEG")


def test_error_wrong_image_size_in_process_and_in_workers(small):
    s = open_imagenet_c(small).corrupted("fog", 5)  # 224 expected, 16 stored
    culprit = str(small / "fog" / "5" / "n01440764" / "ILSVRC2012_val_00000100.jpg")
    one_line_error(lambda: s.read(np.array([0])), culprit, "16×16", "224×224")
    one_line_error(lambda: list(s.iter_batches([np.array([0, 1])], workers=2)), culprit, "224×224")


def test_error_undecodable_file(small):
    bad = small / "fog" / "5" / "n01440764" / NAMES[0]
    bad.write_bytes(b"this is not a JPEG")
    s = open_imagenet_c(small, size=16).corrupted("fog", 5)
    one_line_error(lambda: s.read(np.array([1])), str(bad), "cannot decode")


def test_error_image_ids(small, tmp_path):
    data = open_imagenet_c(small, size=16)
    one_line_error(lambda: data.select(None, ["n01440764/nope.JPEG"]), "'n01440764/nope.JPEG'")
    empty = tmp_path / "ids.txt"
    empty.write_text("# nothing\n\n   \n")
    one_line_error(lambda: read_image_ids(empty), str(empty), "no image id")
    one_line_error(lambda: read_image_ids(tmp_path / "absent.txt"), "absent.txt", "no such file")
    one_line_error(lambda: data.select(0), "positive")


def test_error_no_folder_no_corruptions(tmp_path):
    one_line_error(lambda: open_imagenet_c(tmp_path / "absent"), "absent", "no such folder")
    (tmp_path / "train").mkdir()
    one_line_error(lambda: open_imagenet_c(tmp_path, tiny=True), "tiny-imagenet-c:", "train",
                   "no corruption folder")
    (tmp_path / "fog").mkdir()
    one_line_error(lambda: open_imagenet_c(tmp_path), "no severity folder")
    (tmp_path / "fog" / "1").mkdir()
    one_line_error(lambda: open_imagenet_c(tmp_path), "no class folders")


# ---------------------------------------------------------------------------------------------
# image folder
# ---------------------------------------------------------------------------------------------


def bordered(w: int, h: int, border: int) -> Image.Image:
    """Green image with a red border ``border`` px wide."""
    a = np.zeros((h, w, 3), np.uint8)
    a[..., 0] = 220
    a[border:h - border, border:w - border] = (0, 200, 0)
    return Image.fromarray(a)


def test_imagefolder_resize_and_centre_crop(tmp_path):
    root = tmp_path / "val"
    (root / "zebra").mkdir(parents=True)
    (root / "ant").mkdir()
    (root / ".ipynb_checkpoints").mkdir()  # hidden: no class
    bordered(60, 40, 5).save(root / "zebra" / "wide.png")  # shorter side 40 -> 24: 36×24, crop 16
    bordered(30, 50, 4).save(root / "zebra" / "Tall.PNG")  # shorter side 30 -> 24: 24×40
    write_image(root / "ant" / "a.JPEG", (10, 20, 200), (20, 30))
    (root / "ant" / "notes.txt").write_text("ignored")
    s = open_imagefolder(root, size=16, resize=24)
    assert s.classes == ["ant", "zebra"]
    assert s.ids == ["ant/a.JPEG", "zebra/Tall.PNG", "zebra/wide.png"]
    assert s.labels.tolist() == [0, 1, 1]
    assert s.preprocessing == {"decode": "Pillow, RGB", "resize": 24, "crop": 16, "size": 16}
    x = s.read(np.arange(3))
    assert x.shape == (3, 16, 16, 3)
    assert (x[2] == (0, 200, 0)).all() and (x[1] == (0, 200, 0)).all()  # the red border is cropped away
    assert np.abs(x[0].reshape(-1, 3).mean(0) - (10, 20, 200)).max() < 6
    # the same crop as torchvision's Resize(24) + CenterCrop(16): box (5, 4, 21, 20) of 36×24
    ref = np.asarray(bordered(60, 40, 5).resize((36, 24), Image.BILINEAR).crop((5, 4, 21, 20)))
    np.testing.assert_array_equal(x[2], ref)
    ref = np.asarray(bordered(30, 50, 4).resize((24, 40), Image.BILINEAR).crop((4, 12, 20, 28)))
    np.testing.assert_array_equal(x[1], ref)
    assert s.files().keys() == {str(root)} and s.read_counts == {str(root): 3}
    # as stored: sizes must match
    one_line_error(lambda: open_imagefolder(root, size=16, resize=None).read(np.array([2])),
                   str(root / "zebra" / "wide.png"), "60×40", "16×16")
    anysize = ImageFiles(s.paths, s.labels, root)  # size=None: one size for all
    assert anysize.read(np.array([2])).shape == (1, 40, 60, 3)
    one_line_error(lambda: anysize.read(np.array([1])), "Tall.PNG", "wide.png")


def test_imagefolder_errors(tmp_path):
    one_line_error(lambda: open_imagefolder(tmp_path / "absent"), "absent", "no such folder")
    (tmp_path / "loose.JPEG").write_bytes(b"")
    one_line_error(lambda: open_imagefolder(tmp_path), str(tmp_path), "no class folders")
    write_image(tmp_path / "cat" / "a.jpg", (1, 2, 3), 8)
    (tmp_path / "dog").mkdir()
    one_line_error(lambda: open_imagefolder(tmp_path), str(tmp_path / "dog"), "no images")
    with pytest.raises(ValueError, match="resize"):
        ImageFiles([], np.zeros(0), tmp_path, size=16, resize=8)
    with pytest.raises(ValueError, match="not below"):
        ImageFiles([tmp_path / "cat" / "a.jpg"], np.zeros(1), tmp_path / "dog", size=8)


def test_no_pillow_is_one_line_import_error(tree, monkeypatch):
    s = open_imagenet_c(tree, size=16).corrupted("fog", 2)
    monkeypatch.setitem(sys.modules, "PIL", None)
    for fn in (lambda: s.read(np.array([0])), lambda: list(s.iter_batches([np.array([0])], 2))):
        with pytest.raises(ImportError, match="pip install pillow") as info:
            fn()
        assert "\n" not in str(info.value)


def test_class_index_counts_all_wnids(tmp_path):
    """A class index is the position among all wnids: a tree with fewer class folders than the
    data set has classes is refused unless wnids.txt lists them all, and then labels follow it."""
    root = make_tree(tmp_path / "t", corrs=("fog",), sevs=(2,), wnids=SORTED_WNIDS[:2], names=NAMES[:1])
    (root / "wnids.txt").unlink()
    msg = one_line_error(lambda: open_imagenet_c(root, size=16), "1000", "wnids.txt")
    assert "labels would not match" in msg
    (root / "wnids.txt").write_text("n00000001\n" + "\n".join(WNIDS) + "\n")  # sorts first
    data = open_imagenet_c(root, size=16)
    assert data.num_classes == len(WNIDS) + 1
    assert list(data.corrupted("fog", 2).labels) == [1, 2]
    (root / "wnids.txt").write_text(SORTED_WNIDS[0] + "\n")
    one_line_error(lambda: open_imagenet_c(root, size=16), SORTED_WNIDS[1], "not listed")
