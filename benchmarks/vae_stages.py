"""Stage measurements of the VAE encode and decode paths (shared by encode_bench.py, decode_bench.py and
vae_ab.py): each stage's img/s and the share of the time the GPU was busy.

The stages import the project's code only through `code()`, after the caller has put the code to measure
first on sys.path, so vae_ab.py can time another checkout of the project with the same functions. They
use only what that code and today's both offer; the new switches are passed only when set.

GPU busy share: torch.profiler records every kernel and copy on the GPU (CUDA activity only, so the host
pays no per-operator bookkeeping); the share is the union of their intervals over a wall-clock window.
"""

import importlib
import os
import tempfile
import time
from contextlib import contextmanager
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch

# Colour photographs that ship inside scikit-image's wheel (no download), the sources of the JPEG set.
PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)
# (width, height, weight): ImageNet's training images are mostly 500 pixels on the long side, 375 or 333
# on the short, some portrait, a few larger or smaller; the mix averages about 480 x 400.
SIZES = (
    (500, 375, 40),
    (500, 333, 15),
    (375, 500, 12),
    (333, 500, 5),
    (500, 500, 6),
    (400, 300, 5),
    (640, 480, 5),
    (800, 600, 4),
    (1024, 768, 3),
    (300, 225, 5),
)
SUBPACKAGES = ("", "model.", "sample.", "io.", "train.", "plan.")  # where sida_edm2 modules may live


def code() -> dict:
    """The project's modules the stages use, from whichever checkout is first on sys.path."""

    def sida(name: str):
        for sub in SUBPACKAGES:
            try:
                return importlib.import_module(f"sida_edm2.{sub}{name}")
            except ModuleNotFoundError:
                continue
        raise ModuleNotFoundError(f"sida_edm2.{name} (looked in {', '.join(s or '.' for s in SUBPACKAGES)})")

    return {
        "vae": importlib.import_module("latent.vae"),
        "encode_job": importlib.import_module("latent.encode_job"),
        "prepared": importlib.import_module("preprocess.prepared"),
        "sources": importlib.import_module("preprocess.sources"),
        "networks": sida("networks"),
        "presets": sida("presets"),
        "sampling": sida("sampling"),
        "generate_images": sida("generate_images"),
        "sample_files": sida("sample_files"),
        "tiny_vae": importlib.import_module("latent.tiny_vae"),
    }


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class GpuBusy:
    """Context manager recording the GPU's kernel and copy intervals (nothing on CPU devices)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.intervals: list[tuple[int, int]] = []
        self._profiler = None

    def __enter__(self) -> "GpuBusy":
        if self.device.type == "cuda":
            self._profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
            self._profiler.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._profiler is None:
            return
        sync(self.device)
        self._profiler.__exit__(*exc)
        events = self._profiler.profiler.kineto_results.events()
        cuda = torch.autograd.DeviceType.CUDA
        # Kineto's times are Unix-epoch nanoseconds: comparable with time.time_ns() windows.
        self.intervals = sorted(
            (e.start_ns(), e.end_ns()) for e in events if e.device_type() == cuda and e.duration_ns() > 0
        )

    def share(self, start_ns: int | None = None, end_ns: int | None = None) -> float | None:
        """Busy fraction of [start_ns, end_ns] (default: first to last GPU activity); None on CPU."""
        if not self.intervals:
            return None
        start = self.intervals[0][0] if start_ns is None else start_ns
        end = max(e for _, e in self.intervals) if end_ns is None else end_ns
        busy, reach = 0, start
        for a, b in self.intervals:
            a, b = max(a, reach), min(b, end)
            if b > a:
                busy += b - a
                reach = b
        return busy / max(1, end - start)


@contextmanager
def first_batch_clock():
    """Yields a dict whose "ns" becomes the time.time_ns() at which a DataLoader first handed out a
    batch in this process: the start of the steady state, after model loading and worker start-up."""
    from torch.utils.data import dataloader

    mark: dict = {"ns": None}
    original = dataloader._BaseDataLoaderIter.__next__

    def timed_next(self):
        batch = original(self)
        if mark["ns"] is None:
            mark["ns"] = time.time_ns()
        return batch

    dataloader._BaseDataLoaderIter.__next__ = timed_next
    try:
        yield mark
    finally:
        dataloader._BaseDataLoaderIter.__next__ = original


def _photo_jpeg(args: tuple) -> tuple[int, int, int]:
    """One JPEG of the set: a random crop of a photograph at an ImageNet-like size, quality ~90."""
    from PIL import Image

    index, dest, photo_dir, seed, quality = args
    rng = np.random.default_rng([seed, index])
    with Image.open(Path(photo_dir) / PHOTOS[index % len(PHOTOS)]) as photo:
        photo = photo.convert("RGB")
    weights = np.array([w for _, _, w in SIZES], dtype=np.float64)
    width, height, _ = SIZES[rng.choice(len(SIZES), p=weights / weights.sum())]
    # The largest crop of the target's aspect ratio, shrunk by up to half and placed at random.
    scale = min(photo.width / width, photo.height / height) * rng.uniform(0.5, 1.0)
    cw, ch = max(8, int(width * scale)), max(8, int(height * scale))
    x, y = rng.integers(0, photo.width - cw + 1), rng.integers(0, photo.height - ch + 1)
    image = photo.crop((x, y, x + cw, y + ch)).resize((width, height), Image.LANCZOS)
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    path = Path(dest) / f"n{index % 4:08d}" / f"photo_{index:06d}.JPEG"
    image.save(path, format="JPEG", quality=quality)
    return width, height, path.stat().st_size


def make_photo_jpegs(dest: str | os.PathLike, count: int, seed: int = 0, quality: int = 90) -> dict:
    """`count` JPEGs in ImageNet's train layout (4 class folders) under `dest`; returns size statistics.
    Existing files are kept (a rerun with the same arguments makes the same set)."""
    import skimage

    photo_dir = Path(skimage.__file__).parent / "data"
    missing = [p for p in PHOTOS if not (photo_dir / p).is_file()]
    if missing:
        raise FileNotFoundError(f"scikit-image {skimage.__version__} lacks the photographs {missing}")
    dest = Path(dest)
    for label in range(min(4, count)):
        (dest / f"n{label:08d}").mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(dest), str(photo_dir), seed, quality) for i in range(count)]
    with get_context("spawn").Pool(min(16, os.cpu_count() or 1)) as pool:
        sizes = np.array(pool.map(_photo_jpeg, jobs, chunksize=16), dtype=np.float64)
    return {
        "jpegs": count,
        "mean_width": float(sizes[:, 0].mean()),
        "mean_height": float(sizes[:, 1].mean()),
        "mean_kib": float(sizes[:, 2].mean() / 1024),
        "quality": quality,
    }


def prepare_rate(jpeg_dir: str, resolution: int, images: int) -> dict:
    """One process's JPEG decode + ADM crop rate (what each encode_dataset worker does per image)."""
    c = code()
    source = c["sources"].open_source(jpeg_dir)
    items = source.items[:images]
    dataset = c["prepared"].PreparedItems(source, items, resolution)
    dataset[0]  # imports and first-call costs are not throughput
    start = time.perf_counter()
    for i in range(len(items)):
        dataset[i]
    return {"prepare_img_s_per_process": len(items) / (time.perf_counter() - start)}


def _build_vae(device: torch.device, dtype: torch.dtype, config: dict | None, switches: dict):
    vae_mod = code()["vae"]
    return vae_mod.build_vae(config or vae_mod.SD_VAE_FT_MSE_CONFIG, device, dtype, **switches)


def _timed_loop(fn, iters: int, warmup: int, device: torch.device) -> tuple[float, float | None]:
    """(seconds per call, GPU busy share of the timed calls) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    with GpuBusy(device) as busy:
        start_ns = time.time_ns()
        for _ in range(iters):
            fn()
        sync(device)
        end_ns = time.time_ns()
    return (end_ns - start_ns) / 1e9 / iters, busy.share(start_ns, end_ns)


def encoder_rate(
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    resolution: int,
    iters: int,
    warmup: int = 3,
    config: dict | None = None,
    **switches,
) -> dict:
    """encode_moments alone: pinned uint8 host pixels -> float32 moments on the GPU."""
    vae = _build_vae(device, dtype, config, switches)
    pixels = torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    seconds, busy = _timed_loop(lambda: code()["vae"].encode_moments(vae, pixels), iters, warmup, device)
    return {"encoder_img_s": batch / seconds, "encoder_busy": busy}


def decoder_rate(
    device: torch.device,
    dtype: torch.dtype,
    batch: int,
    resolution: int,
    iters: int,
    warmup: int = 2,
    config: dict | None = None,
    **switches,
) -> dict:
    """decode_to_uint8 alone: EDM2-space latents on the GPU -> uint8 images on the GPU."""
    vae = _build_vae(device, dtype, config, switches)
    latents = torch.randn(batch, 4, resolution // 8, resolution // 8, device=device)
    seconds, busy = _timed_loop(lambda: code()["vae"].decode_to_uint8(vae, latents), iters, warmup, device)
    return {"decoder_img_s": batch / seconds, "decoder_busy": busy}


def save_random_vae(dest: str | os.PathLike, config: dict | None = None, seed: int = 0) -> str:
    """The VAE architecture with seeded random weights, saved once as a --vae directory."""
    dest = Path(dest)
    if not (dest / "config.json").is_file():
        torch.manual_seed(seed)
        vae_mod = code()["vae"]
        vae_mod.build_vae(config or vae_mod.SD_VAE_FT_MSE_CONFIG).save_pretrained(dest)
    return str(dest)


def encode_end_to_end(
    jpeg_dir: str, vae_dir: str, dest: str, device: torch.device, dtype: str, busy: bool = True, **options
) -> dict:
    """encode_dataset's whole job (JPEG decode, crop, VAE, shard writing) on `jpeg_dir` into `dest`.
    img/s over the whole call (model load and worker start-up included) and in the steady state (from
    the first batch handed out to the end), with the GPU's busy share of the steady state (busy=False:
    without the profiler, whose state the DataLoader's forked workers inherit)."""
    job = code()["encode_job"]
    opts = job.EncodeOptions(
        source=jpeg_dir, dest=dest, vae=vae_dir, dtype=dtype, device=str(device), progress=False, **options
    )
    with first_batch_clock() as first, GpuBusy(device if busy else torch.device("cpu")) as meter:
        start_ns = time.time_ns()
        manifest = job.run_encode(opts)
        sync(device)
        end_ns = time.time_ns()
    count = manifest["num_samples"]
    steady_ns = end_ns - (first["ns"] or start_ns)
    return {
        "e2e_images": count,
        "e2e_img_s": count / ((end_ns - start_ns) / 1e9),
        "e2e_steady_img_s": count / (steady_ns / 1e9),
        "e2e_busy": meter.share(first["ns"] or start_ns, end_ns),
    }


def generate_decode_png(
    device: torch.device,
    images: int,
    batch: int,
    dtype: torch.dtype,
    vae_dtype: torch.dtype,
    preset: str = "edm2-img512-xs",
    config: dict | None = None,
    vae_switches: dict | None = None,
    **write_options,
) -> dict:
    """decode_samples.py's loop: one-step generation, VAE decode, PNG files; img/s and GPU busy share."""
    c = code()
    torch.manual_seed(0)
    network = {**c["presets"].get_preset(preset)["network"], "logvar_channels": 0}
    net = c["networks"].Precond(**network).to(device).eval().requires_grad_(False)
    vae = _build_vae(device, vae_dtype, config, vae_switches or {})
    write = c["generate_images"].write_images
    common = {"batch": batch, "dtype": dtype, "device": device, "progress": False, **write_options}
    with tempfile.TemporaryDirectory() as tmp:
        write(net, vae, list(range(batch)), Path(tmp) / "warmup", **common)  # cudnn picks, compilation
        with GpuBusy(device) as busy:
            start_ns = time.time_ns()
            write(net, vae, list(range(images)), Path(tmp) / "timed", **common)
            end_ns = time.time_ns()
    return {
        "gen_png_img_s": images / ((end_ns - start_ns) / 1e9),
        "gen_png_busy": busy.share(start_ns, end_ns),
    }


def generate_rate(device: torch.device, batch: int, iters: int, dtype: torch.dtype, preset: str) -> dict:
    """One-step generation alone (latents stay on the GPU)."""
    c = code()
    network = {**c["presets"].get_preset(preset)["network"], "logvar_channels": 0}
    net = c["networks"].Precond(**network).to(device).eval().requires_grad_(False)
    seeds = list(range(batch))
    with torch.no_grad():
        seconds, busy = _timed_loop(
            lambda: c["sampling"].generate_latents(net, seeds, dtype=dtype), iters, 2, device
        )
    return {"generate_img_s": batch / seconds, "generate_busy": busy}


def png_rate(images: int, batch: int, **writer_options) -> dict:
    """PngWriter alone on 512x512 images of photographic content (PNG cost depends on content)."""
    writer_cls = code()["sample_files"].PngWriter
    rng = np.random.default_rng(0)
    base = np.linspace(0, 255, 512, dtype=np.float32)
    gradient = base[None, :, None] * 0.5 + base[:, None, None] * 0.5
    picture = (gradient + rng.normal(0, 8, (512, 512, 3))).clip(0, 255).astype(np.uint8)
    stack = np.repeat(picture[None], batch, axis=0)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        with writer_cls(tmp, **writer_options) as writer:
            for i in range(0, images, batch):
                writer.submit(stack, list(range(i, i + batch)), None)
        return {"png_img_s": images / (time.perf_counter() - start)}


def gpu_jpeg_check(jpeg_dir: str, images: int, device: torch.device) -> dict:
    """torchvision.io.decode_jpeg on the GPU against PIL: pixel differences and decode rates."""
    import torchvision.io
    from PIL import Image

    paths = sorted(Path(jpeg_dir).rglob("*.JPEG"))[:images]
    data = [torchvision.io.read_file(str(p)) for p in paths]
    start = time.perf_counter()
    reference = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pil_rate = len(paths) / (time.perf_counter() - start)
    torchvision.io.decode_jpeg(data[:4], device=device)  # nvJPEG start-up
    sync(device)
    start = time.perf_counter()
    decoded = torchvision.io.decode_jpeg(data, device=device)
    sync(device)
    gpu_rate = len(paths) / (time.perf_counter() - start)
    diffs = [
        np.abs(d.permute(1, 2, 0).cpu().numpy().astype(np.int16) - r)
        for d, r in zip(decoded, reference, strict=True)
    ]
    return {
        "gpu_jpeg_img_s": gpu_rate,
        "pil_jpeg_img_s_per_process": pil_rate,
        "gpu_jpeg_max_abs_diff": int(max(d.max() for d in diffs)),
        "gpu_jpeg_pixels_differing": float(np.mean([(d > 0).mean() for d in diffs])),
    }


def read_moments(shard_dir: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """key -> (mean, std) of every sample of an encoded dataset (read straight from the tar shards)."""
    import io
    import tarfile

    out: dict[str, list] = {}
    for shard in sorted(Path(shard_dir).glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, _, kind = member.name.partition(".")
                if kind in ("mean.npy", "std.npy"):
                    array = np.load(io.BytesIO(tar.extractfile(member).read())).astype(np.float64)
                    out.setdefault(key, [None, None])[kind == "std.npy"] = array
    return {k: (v[0], v[1]) for k, v in out.items()}


def moment_differences(reference: str | os.PathLike, other: str | os.PathLike) -> dict:
    """Max and mean abs difference of the posterior mean and std between two encodings of one set,
    with the reference's spread of means for scale."""
    ref, new = read_moments(reference), read_moments(other)
    keys = sorted(set(ref) & set(new))
    if not keys:
        return {}
    mean_diff = np.stack([np.abs(ref[k][0] - new[k][0]) for k in keys])
    std_diff = np.stack([np.abs(ref[k][1] - new[k][1]) for k in keys])
    return {
        "samples_compared": len(keys),
        "mean_max_abs": float(mean_diff.max()),
        "mean_mean_abs": float(mean_diff.mean()),
        "std_max_abs": float(std_diff.max()),
        "std_mean_abs": float(std_diff.mean()),
        "reference_mean_spread": float(np.std([ref[k][0] for k in keys])),
        "reference_std_mean": float(np.mean([ref[k][1] for k in keys])),
    }
