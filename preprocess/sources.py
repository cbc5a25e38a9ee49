"""Image sources and their labels: what encode_dataset.py reads, in a fixed order.

    from preprocess.sources import open_source
    source = open_source("/data/imagenet/train")       # or a .zip / .tar of such a tree
    source.kind, source.num_classes, len(source.items)  # ("images", 1000, 1281167)
    data = source.read(source.items[0])                 # the file's bytes (works in worker processes)

Layouts, decided from the files themselves (after stripping single wrapper folders such as `train/`):
- ImageNet train layout: every image sits in a synset folder `nXXXXXXXX/`; the label is the index of
  the synset in sorted order (the standard ImageNet-1k index when all 1000 synsets are present).
- A tree with an EDM2-style `dataset.json` at its root: {"labels": [["rel/path.png", 3], ...]} or
  {"labels": null}; images it does not label are skipped and listed.
- Any other tree of images: unlabelled (num_classes 0).
- EDM2's already-encoded latents (img512-sd.zip): `.npy` arrays [8, h, w] (mean then std) plus
  dataset.json; kind "edm2-latents", imported without re-encoding.
Keys are the file stems (characters other than letters, digits, '_' and '-' become '_', leading '_' are
dropped); when stems collide, the relative paths are used instead, and keys that still collide get a
numeric suffix. Any file name thus gives a valid, unique webdataset key. When a tar holds several
members of one name, the last one is used (as `tar x` would leave it) and the others are listed as
skipped.
"""

import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from preprocess.containers import Container, SourceError, open_container

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
SYNSET = re.compile(r"^n\d{8}$")
LABEL_FILE = "dataset.json"


@dataclass(frozen=True)
class SourceItem:
    key: str  # unique sample key
    path: str  # path inside the source (what the manifest and the log show)
    label: int  # class index, -1 when the source is unlabelled
    location: tuple = ()  # where the bytes are inside the container (tar offset and size)


@dataclass
class Source:
    container: Container  # where the files are (folder, zip, tar)
    kind: str  # "images" or "edm2-latents"
    label_source: str  # "imagenet-synsets", "dataset.json" or "none"
    items: list[SourceItem]  # usable entries, sorted by path
    num_classes: int  # 0 for unlabelled sources
    classes: list[str]  # class names by index (synset ids for ImageNet)
    skipped: list[dict] = field(default_factory=list)  # files excluded while listing: {path, reason}
    ignored_files: int = 0  # files that are neither images nor part of the layout (e.g. README.txt)
    root: str = ""  # wrapper folders stripped from the container's names

    def read(self, item: SourceItem) -> bytes:
        return self.container.read(self._member(item), item.location)

    def _member(self, item: SourceItem) -> str:
        return f"{self.root}/{item.path}" if self.root else item.path

    def describe(self) -> dict:
        return {
            "path": str(self.container.path.resolve()),
            "container": self.container.kind,
            "kind": self.kind,
            "label_source": self.label_source,
            "ignored_files": self.ignored_files,
        }


def _strip_wrappers(names: list[str]) -> str:
    """The common wrapper folder (e.g. "train" or "data/train") above the real root, or ""."""
    root = ""
    while True:
        rest = [n[len(root) + 1 :] if root else n for n in names]
        tops = {r.split("/", 1)[0] for r in rest}
        top = next(iter(tops))
        # An absolute member name ("/data/x.png") has an empty first part: that is no wrapper folder.
        if len(tops) != 1 or any("/" not in r for r in rest) or not top or SYNSET.match(top):
            return root
        root = f"{root}/{top}" if root else top


def _sanitise(text: str) -> str:
    """A valid webdataset key: no '.' (its key/extension separator), no leading '_' (webdataset's own
    fields such as __key__ start with one), never empty."""
    return re.sub(r"[^A-Za-z0-9_\-]", "_", text).lstrip("_") or "file"


def _unique_keys(paths: list[str]) -> list[str]:
    keys = [_sanitise(PurePosixPath(p).stem) for p in paths]
    if len(set(keys)) == len(keys):
        return keys
    keys = [_sanitise(str(PurePosixPath(p).with_suffix(""))) for p in paths]
    natural, used, unique = set(keys), set(), []
    for key in keys:  # sanitising can still merge names ("a.b" / "a_b"): number the repeats, in order
        candidate, n = key, 1
        # A numbered key must not take the plain key of a later file ("a", "a", "a-2").
        while candidate in used or (n > 1 and candidate in natural):
            n += 1
            candidate = f"{key}-{n}"
        used.add(candidate)
        unique.append(candidate)
    return unique


def _read_label_file(container: Container, member: str, location: tuple) -> dict[str, int] | None:
    try:
        data = json.loads(container.read(member, location))
        labels = data.get("labels")
        return None if labels is None else {str(name): int(label) for name, label in labels}
    except (ValueError, TypeError, AttributeError) as exn:
        raise SourceError(f"{member}: not an EDM2-style label file ({exn})") from None


def open_source(path: str) -> Source:
    """Enumerate a source (folder, .zip, .tar, or EDM2 latent zip); SourceError if unusable or empty."""
    container = open_container(path)
    listing = container.listing()
    if not listing:
        raise SourceError(f"source {path} is empty")
    root = _strip_wrappers([name for name, _ in listing])
    named = [(name[len(root) + 1 :] if root else name, loc) for name, loc in listing]
    files = dict(named)  # a tar may repeat a name: the last member wins, as when it is unpacked
    replaced = [
        {"path": name, "reason": "a later member of the same name replaces it"}
        for (name, _), (following, _) in itertools.pairwise(named)
        if name == following
    ]
    images = [n for n in files if PurePosixPath(n).suffix.lower() in IMAGE_EXTENSIONS]
    arrays = [n for n in files if PurePosixPath(n).suffix.lower() == ".npy"]
    label_member = f"{root}/{LABEL_FILE}" if root else LABEL_FILE
    labels = _read_label_file(container, label_member, files[LABEL_FILE]) if LABEL_FILE in files else None
    kind, members = ("edm2-latents", arrays) if arrays and not images else ("images", images)
    if not members:
        raise SourceError(f"source {path} holds no image files (nor EDM2 .npy latents)")
    ignored = len(files) - len(members) - (LABEL_FILE in files)

    skipped, classes = [], []
    if labels is not None:
        label_source = LABEL_FILE
        unlabelled = [n for n in members if n not in labels]
        skipped = [{"path": n, "reason": f"no label in {LABEL_FILE}"} for n in unlabelled]
        members = [n for n in members if n in labels]
        num_classes = max((labels[n] for n in members), default=-1) + 1
        member_labels = [labels[n] for n in members]
    elif kind == "images" and all("/" in n and SYNSET.match(n.split("/", 1)[0]) for n in members):
        label_source = "imagenet-synsets"
        classes = sorted({n.split("/", 1)[0] for n in members})
        index = {synset: i for i, synset in enumerate(classes)}
        num_classes = len(classes)
        member_labels = [index[n.split("/", 1)[0]] for n in members]
    else:
        label_source, num_classes, member_labels = "none", 0, [-1] * len(members)
    if not members:
        raise SourceError(f"source {path}: {LABEL_FILE} labels none of its files")
    items = [
        SourceItem(key=key, path=name, label=label, location=files[name])
        for key, name, label in zip(_unique_keys(members), members, member_labels, strict=True)
    ]
    return Source(
        container=container,
        kind=kind,
        label_source=label_source,
        items=items,
        num_classes=num_classes,
        classes=classes or [str(i) for i in range(num_classes)],
        skipped=replaced + skipped,
        ignored_files=ignored,
        root=root,
    )


def spread_subset(items: list, limit: int | None) -> list:
    """`limit` items spread evenly over the sorted list (so a small run still covers every class)."""
    if limit is None or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]
