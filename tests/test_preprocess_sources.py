"""Source layouts (folder, zip, tar, per-class tars, dataset.json, unlabelled, EDM2 latents) and errors."""

import io
import json
import tarfile
import threading
import zipfile

import numpy as np
import pytest
import torch
from helpers_latent import encode_file, imagenet_tree, random_rgb, write_edm2_latent_zip, write_tree

from preprocess.containers import SourceError
from preprocess.crop import center_crop_dhariwal
from preprocess.image_decode import decode_image
from preprocess.prepared import PreparedItems, collate_prepared
from preprocess.sources import open_source, spread_subset

SYNSETS = ("n01440764", "n01443537", "n02102040")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return imagenet_tree(tmp_path_factory.mktemp("imagenet") / "train", SYNSETS, per_class=2)


def _zip_tree(root, path, prefix="train/"):
    with zipfile.ZipFile(path, "w") as zf:
        for file in sorted(root.rglob("*")):
            if file.is_file():
                zf.write(file, prefix + file.relative_to(root).as_posix())
    return path


def test_imagenet_folder_labels_are_sorted_synset_indices(tree):
    source = open_source(str(tree))
    assert source.kind == "images" and source.label_source == "imagenet-synsets"
    assert source.classes == list(SYNSETS) and source.num_classes == 3
    for item in source.items:
        assert item.label == SYNSETS.index(item.path.split("/")[0])
        assert item.key == item.path.split("/")[1].rsplit(".", 1)[0]
    assert [i.path for i in source.items] == sorted(i.path for i in source.items)
    assert len({i.key for i in source.items}) == len(source.items) == 2 * 3 + 10


def test_zip_with_wrapper_folder_matches_the_folder(tree, tmp_path):
    folder = open_source(str(tree))
    zipped = open_source(str(_zip_tree(tree, tmp_path / "train.zip")))
    assert zipped.root == "train" and zipped.container.kind == "zip"
    assert [(i.key, i.path, i.label) for i in zipped.items] == [
        (i.key, i.path, i.label) for i in folder.items
    ]
    assert zipped.read(zipped.items[3]) == folder.read(folder.items[3])


def test_tar_and_per_class_tars_are_read_in_place(tree, tmp_path):
    folder = open_source(str(tree))
    with tarfile.open(tmp_path / "flat.tar", "w") as tf:
        tf.add(tree, arcname="train")
    # The official ILSVRC2012_img_train.tar layout: one uncompressed tar per synset inside the tar.
    with tarfile.open(tmp_path / "nested.tar", "w") as outer:
        for synset in SYNSETS:
            inner = tmp_path / f"{synset}.tar"
            with tarfile.open(inner, "w") as tf:
                for file in sorted((tree / synset).iterdir()):
                    tf.add(file, arcname=file.name)
            outer.add(inner, arcname=inner.name)
    for name in ("flat.tar", "nested.tar"):
        source = open_source(str(tmp_path / name))
        assert [(i.key, i.path, i.label) for i in source.items] == [
            (i.key, i.path, i.label) for i in folder.items
        ]
        for item, reference in zip(source.items, folder.items, strict=True):
            assert source.read(item) == folder.read(reference)


def test_dataset_json_labels_and_unlabelled_files(tmp_path):
    files = {f"00000/img{i:08d}.png": encode_file(random_rgb(40, 40, i), "PNG") for i in range(4)}
    files["00000/extra.png"] = encode_file(random_rgb(40, 40, 9), "PNG")
    files["README.txt"] = b"not part of the data"
    labels = [[f"00000/img{i:08d}.png", 7 - i] for i in range(4)]
    files["dataset.json"] = json.dumps({"labels": labels}).encode()
    source = open_source(str(write_tree(tmp_path / "edm2", files)))
    assert source.label_source == "dataset.json" and source.num_classes == 8
    assert [(i.key, i.label) for i in source.items] == [(f"img{i:08d}", 7 - i) for i in range(4)]
    assert source.skipped == [{"path": "00000/extra.png", "reason": "no label in dataset.json"}]
    assert source.ignored_files == 1


def test_unlabelled_folder_and_colliding_stems(tmp_path):
    files = {
        name: encode_file(random_rgb(40, 40, i), "JPEG")
        for i, name in enumerate(["a/x.jpg", "b/x.jpg", "c.d.png"])
    }
    source = open_source(str(write_tree(tmp_path / "plain", files)))
    assert source.label_source == "none" and source.num_classes == 0
    assert {i.label for i in source.items} == {-1}
    assert [i.key for i in source.items] == ["a_x", "b_x", "c_d"]  # stems collide: relative paths


def test_edm2_latent_zip_is_detected(tmp_path):
    write_edm2_latent_zip(tmp_path / "img512-sd.zip", labels=[3, 1, 4])
    source = open_source(str(tmp_path / "img512-sd.zip"))
    assert source.kind == "edm2-latents" and source.num_classes == 5
    assert [(i.key, i.label) for i in source.items] == [
        ("img00000000", 3),
        ("img00000001", 1),
        ("img00000002", 4),
    ]


def test_prepared_items_in_worker_processes(tree, tmp_path):
    source = open_source(str(_zip_tree(tree, tmp_path / "train.zip")))
    loader = torch.utils.data.DataLoader(
        PreparedItems(source, source.items, 32), batch_size=4, num_workers=2, collate_fn=collate_prepared
    )
    batches = list(loader)
    records = [r for batch in batches for r in batch["records"]]
    assert [r["index"] for r in records] == list(range(len(source.items)))
    bad = {r["item"].path.split("_", 1)[1] for r in records if r["reason"]}
    assert bad == {"bad_text.JPEG", "bad_truncated.JPEG"}
    good = [r for r in records if r["reason"] is None]
    pixels = torch.cat([b["pixels"] for b in batches if b["pixels"] is not None])
    assert pixels.shape == (len(good), 3, 32, 32) and pixels.dtype == torch.uint8
    image, _, _ = decode_image(source.read(good[-1]["item"]))
    expected = center_crop_dhariwal(image, 32).transpose(2, 0, 1)
    assert np.array_equal(pixels[-1].numpy(), expected)  # row i is the i-th usable record's image
    tiny = next(r for r in good if r["item"].key.endswith("_tiny"))
    assert tiny["upscaled"] and tiny["info"]["original_size"] == [5, 3]
    image, _, _ = decode_image(source.read(good[0]["item"]))
    assert good[0]["info"]["original_size"] == list(image.size)


def test_spread_subset_covers_the_listing():
    assert spread_subset(list(range(10)), 3) == [0, 3, 6]
    assert spread_subset(list(range(4)), 9) == [0, 1, 2, 3]
    assert spread_subset(list(range(4)), None) == [0, 1, 2, 3]


def test_source_errors(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        open_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="empty"):
        open_source(str(tmp_path / "empty"))
    write_tree(tmp_path / "text", {"notes.txt": b"hello"})
    with pytest.raises(SourceError, match="no image files"):
        open_source(str(tmp_path / "text"))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tf:
        info = tarfile.TarInfo("a.png")
        data = encode_file(random_rgb(8, 8, 0), "PNG")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    (tmp_path / "images.tar.gz").write_bytes(buffer.getvalue())
    with pytest.raises(SourceError, match="compressed tar"):
        open_source(str(tmp_path / "images.tar.gz"))
    (tmp_path / "plain.bin").write_bytes(b"just some bytes, not an archive\n" * 40)
    with pytest.raises(SourceError, match="neither"):
        open_source(str(tmp_path / "plain.bin"))


def test_tar_of_absolute_names_is_listed(tmp_path):
    # Such a tar (made with `tar -P`) once sent the wrapper-folder search into an endless loop.
    with tarfile.open(tmp_path / "abs.tar", "w") as tar:
        for i, name in enumerate(["/data/x/a.png", "/data/y/a.png"]):
            data = encode_file(random_rgb(40, 40, i), "PNG")
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    result = []
    # A daemon thread: if the loop came back, the test fails after 30 s instead of hanging pytest.
    listing = threading.Thread(
        target=lambda: result.append(open_source(str(tmp_path / "abs.tar"))), daemon=True
    )
    listing.start()
    listing.join(timeout=30)
    assert result, "listing a tar of absolute names did not finish"
    source = result[0]
    assert [(i.key, i.path) for i in source.items] == [
        ("data_x_a", "/data/x/a.png"),
        ("data_y_a", "/data/y/a.png"),
    ]
    assert source.read(source.items[1]) == encode_file(random_rgb(40, 40, 1), "PNG")


def test_symlink_loops_and_repeated_links_list_each_file_once(tmp_path):
    files = {
        f"{s}/{s}_{i}.JPEG": encode_file(random_rgb(40, 40, i), "JPEG") for s in SYNSETS[:2] for i in (0, 1)
    }
    looped = write_tree(tmp_path / "looped", files)
    (looped / SYNSETS[0] / "loop").symlink_to("..")  # a link back up: os.walk went round it dozens of times
    (looped / SYNSETS[1] / "same.JPEG").symlink_to(looped / SYNSETS[1] / f"{SYNSETS[1]}_0.JPEG")
    linked = write_tree(tmp_path / "linked", files)
    (linked / SYNSETS[1] / "again").symlink_to(linked / SYNSETS[0])  # a second way into a folder
    for root in (looped, linked):
        assert sorted(i.path for i in open_source(str(root)).items) == sorted(files)
