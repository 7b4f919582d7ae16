"""Data readers and preprocessing: layouts, clear errors for wrong ones, exact transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from postquant.errors import DataError
from postquant_lab.zoo.datasets import (
    CIFAR10_PREPROCESS,
    MNIST_PREPROCESS,
    SentencePair,
    TextPreprocess,
    calibration_inputs,
    center_crop_resize,
    efficientnet_lite_preprocess,
    open_eval_data,
    read_image_folder,
    read_npz_images,
    read_sentences,
    read_sts_pairs,
    spread_indices,
)


def _write_image(path, seed: int, size=(20, 16)) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _cifar_like(tmp_path, n: int = 10, **extra) -> object:
    rng = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    arrays = {
        "x": rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
        "y": np.arange(n, dtype=np.uint8) % 10,
    }
    arrays.update(extra)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


# ------------------------------------------------------------------------------------------------ npz


def test_npz_roundtrip_and_cifar_normalisation(tmp_path):
    path = _cifar_like(tmp_path, n=10)
    data = open_eval_data(path, CIFAR10_PREPROCESS, batch_size=4)
    assert (data.n, len(data), data.task) == (10, 3, "classification")
    batches = list(data)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    x = np.load(path)["x"]
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected = ((x.astype(np.float32) / 255 - mean) / std).transpose(0, 3, 1, 2)
    got = torch.cat([b for b, _ in batches]).numpy()
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    assert torch.cat([y for _, y in batches]).dtype == torch.int64


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": None}, r"has keys \['x'\]; expected an .npz file with 'x'"),
        ({"x": None}, r"has keys \['y'\]"),
        ({"x": np.zeros((10, 32, 32, 3), np.float32)}, "'x' is float32"),
        ({"y": np.zeros(7, np.int64)}, "'y' is int64 \\(7,\\) for 10 images"),
        ({"x": np.zeros((0, 32, 32, 3), np.uint8), "y": np.zeros(0, np.int64)}, "holds no images"),
    ],
    ids=["no-y", "no-x", "float-x", "short-y", "empty"],
)
def test_npz_wrong_layout(tmp_path, arrays, message):
    path = _cifar_like(tmp_path, **arrays)
    with pytest.raises(DataError, match=message):
        open_eval_data(path, CIFAR10_PREPROCESS)


def test_npz_without_labels_is_fine_for_calibration(tmp_path):
    path = _cifar_like(tmp_path, y=None)
    batches = calibration_inputs(path, CIFAR10_PREPROCESS, batch_size=4)
    assert [tuple(b.shape) for b in batches] == [(4, 3, 32, 32), (4, 3, 32, 32), (2, 3, 32, 32)]


def test_npz_not_a_zip(tmp_path):
    path = tmp_path / "bad.npz"
    path.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        read_npz_images(path)


def test_grayscale_npz_gets_a_channel_axis(tmp_path):
    path = tmp_path / "mnist.npz"
    np.savez(path, x=np.full((3, 28, 28), 255, np.uint8), y=np.array([1, 2, 3]))
    ((x, _),) = list(open_eval_data(path, MNIST_PREPROCESS))
    assert tuple(x.shape) == (3, 1, 28, 28)
    torch.testing.assert_close(x, torch.full_like(x, (1 - 0.1307) / 0.3081))
    with pytest.raises(DataError, match="1 channels, the model expects 3"):
        open_eval_data(path, CIFAR10_PREPROCESS)


def test_missing_path_says_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="is missing") as info:
        open_eval_data(tmp_path / "nowhere.npz", CIFAR10_PREPROCESS)
    assert "POSTQUANT_SHARED" in str(info.value)
    assert "--data" in str(info.value)


def test_unknown_file_type(tmp_path):
    path = tmp_path / "data.json"
    path.write_text("{}")
    with pytest.raises(DataError, match=r"neither an \.npz file nor a folder"):
        open_eval_data(path, CIFAR10_PREPROCESS)


# -------------------------------------------------------------------------------------------- folders


def test_empty_folder(tmp_path):
    with pytest.raises(DataError, match=r"has no images; expected an image folder with labels\.csv"):
        open_eval_data(tmp_path, efficientnet_lite_preprocess())


def test_folder_without_labels(tmp_path):
    for i in range(3):
        _write_image(tmp_path / f"img{i}.png", i)
    with pytest.raises(DataError, match=r"3 images but no labels\.csv and no class subfolders"):
        open_eval_data(tmp_path, efficientnet_lite_preprocess())
    (batch,) = calibration_inputs(
        tmp_path, efficientnet_lite_preprocess(32), batch_size=8
    )  # unlabelled is fine
    assert tuple(batch.shape) == (3, 3, 32, 32)


def test_labels_csv(tmp_path):
    for i in range(3):
        _write_image(tmp_path / f"img{i}.png", i)
    (tmp_path / "labels.csv").write_text("file,label\nimg2.png,7\nimg0.png,3\n")
    files, labels = read_image_folder(tmp_path)
    assert [f.name for f in files] == ["img2.png", "img0.png"] and labels == [7, 3]
    ((_, y),) = list(open_eval_data(tmp_path, efficientnet_lite_preprocess(24)))
    assert y.tolist() == [7, 3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,class\nimg0.png,1\n", "expected the header 'file,label'"),
        ("file,label\nimg0.png,cat\n", "line 2: label 'cat' is not an integer"),
        ("file,label\nmissing.png,1\n", "lists 1 files missing"),
        ("file,label\n", "lists no images"),
    ],
    ids=["header", "label", "missing-file", "no-rows"],
)
def test_bad_labels_csv(tmp_path, text, message):
    _write_image(tmp_path / "img0.png", 0)
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        read_image_folder(tmp_path)


def test_class_subfolders(tmp_path):
    for name, count in (("zebra", 2), ("ant", 1), ("empty", 0)):
        (tmp_path / name).mkdir()
        for i in range(count):
            _write_image(tmp_path / name / f"{i}.jpg", i)
    files, labels = read_image_folder(tmp_path)
    assert [(f.parent.name, label) for f, label in zip(files, labels, strict=True)] == [
        ("ant", 0),
        ("zebra", 1),
        ("zebra", 1),
    ]


def test_undecodable_image(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "labels.csv").write_text("file,label\nbroken.jpg,0\n")
    with pytest.raises(DataError, match="cannot decode image"):
        list(open_eval_data(tmp_path, efficientnet_lite_preprocess()))


# ------------------------------------------------------------------------------------- image transforms


def test_center_crop_resize_matches_the_tf_rule():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (227, 227, 3), dtype=np.uint8))
    # c = round(224/256 * 227) = round(198.625) = 199; top-left ((227-199)//2, ...) = (14, 14)
    expected = img.crop((14, 14, 213, 213)).resize((224, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(center_crop_resize(img, 224, 224 / 256)), np.asarray(expected))
    wide = Image.fromarray(rng.integers(0, 256, (100, 300, 3), dtype=np.uint8))  # h=100, w=300: c=88
    expected = wide.crop((106, 6, 194, 94)).resize((224, 224), Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(center_crop_resize(wide, 224, 224 / 256)), np.asarray(expected))


def test_lite_scaling_is_tf_style():
    pre = efficientnet_lite_preprocess(224)
    x = pre.normalize(np.array([0, 127, 255], np.uint8).reshape(1, 1, 3, 1).repeat(3, axis=3))
    torch.testing.assert_close(x[0, 0, 0], torch.tensor([-127 / 128, 0.0, 1.0]), rtol=0, atol=0)


def test_lite_preprocess_on_an_rgba_png(tmp_path):
    Image.new("RGBA", (40, 30), (255, 0, 127, 10)).save(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text("file,label\na.png,5\n")
    ((x, y),) = list(open_eval_data(tmp_path, efficientnet_lite_preprocess(16)))
    assert tuple(x.shape) == (1, 3, 16, 16) and y.tolist() == [5]
    torch.testing.assert_close(x[0, :, 8, 8], torch.tensor([1.0, -127 / 128, 0.0]), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ text


class FakeTokenizer:
    """Word-count tokenizer with the Hugging Face call signature (padding to the batch's longest)."""

    def __call__(self, sentences, max_length, truncation, padding, return_tensors):
        lengths = [min(len(s.split()), max_length) for s in sentences]
        width = max(lengths)
        mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths])
        return {"input_ids": mask * 5, "attention_mask": mask}


def _write_sts(path, rows) -> None:
    path.write_text("".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")


def test_sts_reads_columns_4_5_6_and_ignores_extra_columns(tmp_path):
    path = tmp_path / "sts.csv"
    _write_sts(
        path,
        [
            [
                "main-news",
                "headlines",
                "2015",
                "0001",
                "4.2",
                'A "quoted" man runs.',
                "A man runs.",
                "src1",
                "src2",
            ],
            ["main-forum", "answers", "2016", "0002", "0.5", "One two three four", "Five"],
        ],
    )
    first, second, scores = read_sts_pairs(path)
    assert first == ['A "quoted" man runs.', "One two three four"]
    assert second == ["A man runs.", "Five"]
    np.testing.assert_array_equal(scores, [4.2, 0.5])
    ((pair, gold),) = list(open_eval_data(path, TextPreprocess(FakeTokenizer(), max_length=3)))
    assert isinstance(pair, SentencePair) and gold.tolist() == [4.2, 0.5]
    assert pair.first["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 1]]  # truncated at max_length
    assert pair.second["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert read_sentences(path) == [first[0], second[0], first[1], second[1]]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["a", "b", "c", "d", "4.0", "only one sentence"]], "line 1 has 6 columns"),
        ([["a", "b", "c", "d", "high", "s1", "s2"]], "score 'high' is not a number"),
        ([], "no sentence pairs"),
    ],
    ids=["short-row", "bad-score", "empty"],
)
def test_sts_bad_rows(tmp_path, rows, message):
    path = tmp_path / "sts.csv"
    _write_sts(path, rows)
    with pytest.raises(DataError, match=message):
        read_sts_pairs(path)


def test_text_model_refuses_image_data(tmp_path):
    path = _cifar_like(tmp_path)
    with pytest.raises(DataError, match="this is a text model"):
        open_eval_data(path, TextPreprocess(FakeTokenizer()))


def test_text_calibration_from_txt(tmp_path):
    path = tmp_path / "sentences.txt"
    path.write_text("one two\n\nthree four five\nsix\n")
    batches = calibration_inputs(path, TextPreprocess(FakeTokenizer()), batch_size=2)
    assert [b["attention_mask"].tolist() for b in batches] == [[[1, 1, 0], [1, 1, 1]], [[1]]]


# ---------------------------------------------------------------------------------------------- limits


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), limit=st.integers(1, 6000))
def test_spread_indices(n, limit):
    idx = spread_indices(n, limit)
    assert len(idx) == min(n, limit)
    assert idx[0] == 0 and idx[-1] < n
    assert np.all(np.diff(idx) > 0)


def test_spread_indices_covers_sorted_classes():
    labels = np.repeat(np.arange(10), 1000)  # the layout of CIFAR-10 test.npz
    assert np.bincount(labels[spread_indices(10_000, 1000)]).tolist() == [100] * 10
    with pytest.raises(DataError, match="limit must be at least 1"):
        spread_indices(10, 0)


def test_bad_batch_size(tmp_path):
    with pytest.raises(DataError, match="batch_size must be at least 1"):
        open_eval_data(_cifar_like(tmp_path), CIFAR10_PREPROCESS, batch_size=0)
