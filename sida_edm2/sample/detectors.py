"""Feature extractors for FID (Inception-v3, 2048-d) and FD_DINOv2 (DINOv2 ViT-L/14, 1024-d).

Both take uint8 images [N,3,H,W] (any H, W) and return float32 features [N,D]:

    det = load_detector("fid", inception="~/.cache/sida_edm2/inception-2015-12-05.pt", device="cuda")
    det = load_detector("fd_dinov2", dinov2="~/.cache/sida_edm2/dinov2-large", device="cuda")
    features = det(images_uint8)

- FID uses the TorchScript Inception of the StyleGAN/EDM tooling (`inception-2015-12-05.pt`), called
  as `module(images_uint8, return_features=True)`; it resizes to 299 itself.
- FD_DINOv2 follows EDM2's protocol: pixels / 255, bicubic resize to 224x224 with antialiasing,
  ImageNet mean/std normalisation, the final-layer-normed CLS token. The ViT-L/14 is built offline
  by `transformers.Dinov2Model` from a local copy of the `facebook/dinov2-large` repository (a port of
  the official weights EDM2 loads through torch.hub; values agree closely, not bit for bit).
  transformers is an optional dependency: `pip install transformers`.

Weights are never fetched implicitly: a missing file raises MissingWeightsError naming the file, where
to get it and where to put it. `--inception` also accepts an http(s) URL, downloaded once to the cache.
"""

import os
import urllib.parse
import urllib.request
from pathlib import Path

import torch

METRICS = ("fid", "fd_dinov2")

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
)
DINOV2_DIR = "dinov2-large"
DINOV2_REPO = "facebook/dinov2-large"
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class MissingWeightsError(FileNotFoundError):
    """A metric's network weights are not where they were looked for."""


def default_cache_dir() -> Path:
    """$SIDA_EDM2_CACHE, else ~/.cache/sida_edm2: where detector weights are looked for by default."""
    return Path(os.environ.get("SIDA_EDM2_CACHE", Path.home() / ".cache" / "sida_edm2")).expanduser()


class InceptionDetector(torch.nn.Module):
    """FID features from the StyleGAN/EDM TorchScript Inception-v3 (or any module with its signature)."""

    def __init__(
        self,
        module: torch.nn.Module,  # Called as module(images_uint8, return_features=True) -> [N, 2048].
    ):
        super().__init__()
        self.module = module

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images, return_features=True).to(torch.float32)


class DinoV2Detector(torch.nn.Module):
    """FD_DINOv2 features: EDM2's preprocessing in front of a backbone that maps normalised
    [N,3,224,224] images to [N,D] (the CLS token), e.g. `HFDinov2Backbone`."""

    def __init__(
        self,
        backbone: torch.nn.Module,  # Normalised float32 [N,3,224,224] -> features [N, D].
        resolution: int = DINOV2_RESOLUTION,  # Side of the square input the backbone sees.
    ):
        super().__init__()
        self.backbone = backbone
        self.resolution = resolution
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [N,3,H,W] -> normalised float32 [N,3,224,224]."""
        x = images.to(torch.float32) / 255
        x = torch.nn.functional.interpolate(
            x, size=(self.resolution, self.resolution), mode="bicubic", antialias=True, align_corners=False
        )
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(self.preprocess(images)).to(torch.float32)


class HFDinov2Backbone(torch.nn.Module):
    """transformers' Dinov2Model reduced to the layer-normed CLS token (its pooler_output)."""

    def __init__(
        self,
        model: torch.nn.Module,  # A transformers.Dinov2Model.
    ):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).pooler_output


def _download(url: str, cache_dir: Path) -> Path:
    dest = cache_dir / Path(urllib.parse.urlparse(url).path).name
    if not dest.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            urllib.request.urlretrieve(url, tmp)
        except OSError as exc:
            raise MissingWeightsError(
                f"could not download {url} ({exc}); fetch it by hand and pass its path, or place it at {dest}"
            ) from exc
        os.replace(tmp, dest)
    return dest


def resolve_inception(path_or_url: str | os.PathLike | None) -> Path:
    """The local TorchScript file: the given path, a URL downloaded into the cache, or the default
    cache location. Raises MissingWeightsError with instructions when it does not exist."""
    if path_or_url is not None and str(path_or_url).startswith(("http://", "https://")):
        return _download(str(path_or_url), default_cache_dir())
    path = Path(path_or_url).expanduser() if path_or_url else default_cache_dir() / INCEPTION_FILE
    if not path.is_file():
        raise MissingWeightsError(
            f"FID needs the Inception-v3 TorchScript file {INCEPTION_FILE}, not found at {path}. "
            f"Download {INCEPTION_URL} and put it at {default_cache_dir() / INCEPTION_FILE} "
            f"(or pass --inception PATH or --inception URL)."
        )
    return path


def load_inception(
    path_or_url: str | os.PathLike | None = None, device: str | torch.device = "cpu"
) -> InceptionDetector:
    """FID detector from the TorchScript Inception (see resolve_inception for where it is looked for)."""
    module = torch.jit.load(str(resolve_inception(path_or_url)), map_location=device).eval()
    return InceptionDetector(module).to(device).eval().requires_grad_(False)


def load_dinov2(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DinoV2Detector:
    """FD_DINOv2 detector from a local transformers-format DINOv2 directory (config.json + weights)."""
    path = Path(path).expanduser() if path else default_cache_dir() / DINOV2_DIR
    if not (path / "config.json").is_file():
        raise MissingWeightsError(
            f"FD_DINOv2 needs the DINOv2 ViT-L/14 weights in transformers format (config.json and "
            f"model.safetensors of the Hugging Face repository {DINOV2_REPO}), not found at {path}. "
            f"Get them with `hf download {DINOV2_REPO} --local-dir {default_cache_dir() / DINOV2_DIR}` "
            f"(or pass --dinov2 DIR)."
        )
    try:
        from transformers import Dinov2Model
    except ImportError as exc:
        raise ImportError(
            "FD_DINOv2 needs the optional dependency transformers: pip install transformers"
        ) from exc
    # float32 whatever dtype the checkpoint was saved in (EDM2 evaluates the detector in float32).
    model = Dinov2Model.from_pretrained(str(path), local_files_only=True).float()
    return DinoV2Detector(HFDinov2Backbone(model)).to(device).eval().requires_grad_(False)


def load_detector(
    name: str,
    inception: str | os.PathLike | None = None,
    dinov2: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """The detector of metric `name` ('fid' or 'fd_dinov2')."""
    if name == "fid":
        return load_inception(inception, device)
    if name == "fd_dinov2":
        return load_dinov2(dinov2, device)
    raise ValueError(f"unknown metric {name!r}; choose from {', '.join(METRICS)}")
