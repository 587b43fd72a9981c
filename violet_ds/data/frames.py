"""Frames: JPEG decoding, temporal sampling and spatial transforms, all on tensors.

Videos stay uint8 `(T, 3, H, W)` from decoding until `normalize`, which runs on the training device:
uint8 batches are 4x smaller to pin and copy than float ones.

JPEG decoders (`violet-ds bench data` measures them): `simplejpeg` (libjpeg-turbo, wheels for every
major platform, and it can decode straight to a reduced DCT scale when the target is much smaller)
and `pillow`. `auto` picks the first one that imports, in that order; PNG frames (and anything a JPEG
decoder rejects) fall back to Pillow. (`torchvision.io.decode_jpeg`, once a third choice, is
deprecated since torchvision 0.29 in favour of TorchCodec; simplejpeg is the same libjpeg-turbo.)
"""

from __future__ import annotations

import base64
import binascii
import io
import math
from typing import Literal, Optional, Sequence, Union

import numpy as np
import torch

# each JPEG library is optional on its own (`available_decoders` lists the installed ones, `auto` takes the first)
try:
    import simplejpeg
except ImportError:
    simplejpeg = None
try:
    from PIL import Image
except ImportError:
    Image = None
# torchvision (a second or more on top of torch) is imported by `resize` only: extraction, validate-tsv and
# predict's file reading import this module without it

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DECODERS = ("simplejpeg", "pillow")


class FrameDecodeError(ValueError):
    """A frame that is not valid base64 or not a decodable image."""


# ---------------------------------------------------------------- decoding

def _to_bytes(data: Union[bytes, bytearray, memoryview, str]) -> bytes:
    if isinstance(data, str):
        data = data.encode("ascii", errors="strict") if data.isascii() else None
        if data is None:
            raise FrameDecodeError("frame string is not base64 (non-ASCII characters)")
    data = bytes(data)
    if data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n":
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as err:
        hint = ""
        if data.rstrip(b"\n").endswith(b"\r"):
            hint = ("; it ends with a carriage return: the TSV has Windows (CRLF) line endings - convert it "
                    "(`sed -i 's/\\r$//' FILE.tsv`) and rebuild its index (`violet-ds build-index --tsv FILE.tsv --force true`)")
        raise FrameDecodeError(f"frame is neither an image nor valid base64 ({err}){hint}") from err


def _decode_pillow(raw: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(raw)) as image:
        return np.array(image.convert("RGB"))


def _decode_simplejpeg(raw: bytes, min_height: int = 0, min_width: int = 0) -> np.ndarray:
    return simplejpeg.decode_jpeg(raw, colorspace="RGB", min_height=min_height, min_width=min_width)


def available_decoders() -> list[str]:
    installed = {"simplejpeg": simplejpeg, "pillow": Image}
    return [name for name in DECODERS if installed[name] is not None]


_AUTO: Optional[str] = None


def resolve_decoder(name: str = "auto") -> str:
    global _AUTO
    if name == "auto":
        if _AUTO is None:
            found = available_decoders()
            if not found:
                raise ImportError("no JPEG decoder: install simplejpeg or pillow")
            _AUTO = found[0]
        return _AUTO
    if name not in DECODERS:
        extra = " (torchvision.io.decode_jpeg is deprecated; simplejpeg is the same libjpeg-turbo)" \
            if name == "torchvision" else ""
        raise ValueError(f"unknown JPEG decoder {name!r}; choose from auto, {', '.join(DECODERS)}{extra}")
    return name


def decode_jpeg(data: Union[bytes, str], decoder: str = "auto", min_size: int = 0) -> torch.Tensor:
    """A JPEG (raw bytes, or base64 bytes/str as stored in TSVs) -> uint8 tensor `(3, H, W)`.

    `min_size` lets simplejpeg decode at a reduced DCT scale whose short side stays >= min_size.
    """
    raw = _to_bytes(data)
    name = resolve_decoder(decoder)
    is_jpeg = raw[:3] == b"\xff\xd8\xff"
    try:
        if not is_jpeg or name == "pillow":
            array = _decode_pillow(raw)
        else:
            array = _decode_simplejpeg(raw, min_size, min_size)
    except FrameDecodeError:
        raise
    except Exception as err:  # every decoder raises its own types for corrupt data
        raise FrameDecodeError(f"undecodable image ({type(err).__name__}: {err})") from err
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    # numpy's single-threaded transpose: torch's parallel strided copy is 3x slower on small frames
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def decode_frames(frames: Sequence[Union[bytes, str]], decoder: str = "auto", min_size: int = 0) -> torch.Tensor:
    """A list of encoded frames -> uint8 `(T, 3, H, W)`; frames of another size are resized to the first's."""
    decoded = []
    for number, frame in enumerate(frames):
        try:
            decoded.append(decode_jpeg(frame, decoder, min_size))
        except FrameDecodeError as err:
            raise FrameDecodeError(f"frame {number}: {err}") from err
    if not decoded:
        raise FrameDecodeError("no frames")
    height, width = decoded[0].shape[-2:]
    for index, frame in enumerate(decoded):
        if frame.shape[-2:] != (height, width):
            decoded[index] = resize(frame[None], (height, width))[0]
    return torch.stack(decoded)


# ---------------------------------------------------------------- temporal sampling

def sample_frame_indices(num_available: int, num_frames: int, train: bool = False,
                         generator: Optional[torch.Generator] = None,
                         short: Literal["loop", "pad", "repeat"] = "repeat") -> torch.Tensor:
    """Which stored frames make a clip of `num_frames`.

    Eval: the centre of each of `num_frames` equal segments (deterministic). Train: a random frame
    inside each segment (TSN style), so every epoch sees other frames of long rows. When the row has
    fewer frames than asked: `repeat` stretches them evenly (0,0,1,1,2), `loop` cycles (0,1,2,0,1),
    `pad` keeps them in order and repeats the last one (0,1,2,2,2).
    """
    if num_available <= 0:
        raise ValueError("a row with no frames cannot be sampled")
    if num_frames <= 0:
        raise ValueError(f"num_frames must be positive, got {num_frames}")
    if num_available < num_frames:
        steps = torch.arange(num_frames)
        if short == "loop":
            return steps % num_available
        if short == "pad":
            return steps.clamp(max=num_available - 1)
        if short == "repeat":
            return (steps * num_available) // num_frames
        raise ValueError(f"unknown short-row policy {short!r} (loop, pad, repeat)")
    edges = torch.arange(num_frames + 1, dtype=torch.float64) * (num_available / num_frames)
    if train:
        offsets = torch.rand(num_frames, generator=generator, dtype=torch.float64)
        positions = edges[:-1] + offsets * (edges[1:] - edges[:-1])
    else:
        positions = (edges[:-1] + edges[1:]) / 2
    return positions.floor().long().clamp(0, num_available - 1)


# ---------------------------------------------------------------- spatial transforms

def resize(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize uint8/float `(..., 3, H, W)` to `size` (antialiased bilinear), keeping the dtype."""
    from torchvision.transforms.v2 import functional as tvf

    if tuple(video.shape[-2:]) == tuple(size):
        return video
    return tvf.resize(video, list(size), antialias=True)


def resize_short_side(video: torch.Tensor, short: int) -> torch.Tensor:
    height, width = video.shape[-2:]
    scale = short / min(height, width)
    return resize(video, (max(short, round(height * scale)), max(short, round(width * scale))))


def crop(video: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    return video[..., top:top + height, left:left + width]


def center_crop(video: torch.Tensor, size: int) -> torch.Tensor:
    height, width = video.shape[-2:]
    return crop(video, (height - size) // 2, (width - size) // 2, size, size)


def random_crop(video: torch.Tensor, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    height, width = video.shape[-2:]
    top = int(torch.randint(0, height - size + 1, (1,), generator=generator))
    left = int(torch.randint(0, width - size + 1, (1,), generator=generator))
    return crop(video, top, left, size, size)


def pad_to_square(video: torch.Tensor, value: int = 0) -> torch.Tensor:
    height, width = video.shape[-2:]
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    return torch.nn.functional.pad(video, (left, side - width - left, top, side - height - top), value=value)


def hflip(video: torch.Tensor) -> torch.Tensor:
    return video.flip(-1)


SpatialMode = Literal["resize", "crop", "pad"]


class VideoTransform:
    """uint8 `(T,3,H,W)` -> uint8 `(T,3,size,size)`; one random draw per clip (same crop for all frames).

    `resize` squashes to a square; `crop` resizes the short side to `size` then takes a random (train)
    or centre (eval) square; `pad` pads to a square (aspect kept, nothing cut) then resizes.
    `flip` mirrors half of the training clips: leave it off when text mentions left/right.
    `scale` (train, crop mode) first resizes the short side to `size * U(1, scale)` so crops vary in scale.
    """

    def __init__(self, size: int, train: bool = False, mode: SpatialMode = "crop", flip: bool = False,
                 scale: float = 1.0):
        if mode not in ("resize", "crop", "pad"):
            raise ValueError(f"unknown spatial mode {mode!r} (resize, crop, pad)")
        self.size, self.train, self.mode, self.flip, self.scale = size, train, mode, flip, scale

    def __call__(self, video: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        size = self.size
        if self.mode == "resize":
            video = resize(video, (size, size))
        elif self.mode == "pad":
            video = resize(pad_to_square(video), (size, size))
        else:
            short = size
            if self.train and self.scale > 1.0:
                short = int(math.floor(size * (1.0 + float(torch.rand(1, generator=generator)) * (self.scale - 1.0))))
            video = resize_short_side(video, short)
            video = random_crop(video, size, generator) if self.train else center_crop(video, size)
        if self.train and self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            video = hflip(video)
        return video.contiguous()


# ---------------------------------------------------------------- normalisation (on device)

def normalize(video: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
              std: Sequence[float] = IMAGENET_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `(..., 3, H, W)` -> float `(x/255 - mean) / std`, on the tensor's own device."""
    if video.shape[-3] != 3:
        raise ValueError(f"normalize expects channels at dim -3 (..., 3, H, W), got shape {tuple(video.shape)}")
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=dtype, device=video.device).view(shape)
    std_t = torch.tensor(std, dtype=dtype, device=video.device).view(shape)
    scaled = video.to(dtype) / 255.0 if video.dtype == torch.uint8 else video.to(dtype)
    return (scaled - mean_t) / std_t


def to_unit_range(video: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                  std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Undo `normalize`'s mean/std: float `(..., 3, H, W)` pixel values in [0, 1] (not clamped)."""
    shape = (3, 1, 1)
    mean_t = torch.tensor(mean, dtype=video.dtype, device=video.device).view(shape)
    std_t = torch.tensor(std, dtype=video.dtype, device=video.device).view(shape)
    return video * std_t + mean_t


def denormalize(video: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN,
                std: Sequence[float] = IMAGENET_STD) -> torch.Tensor:
    """Inverse of `normalize` -> uint8 (for TensorBoard images)."""
    return (to_unit_range(video, mean, std) * 255.0).round().clamp(0, 255).to(torch.uint8)


# ---------------------------------------------------------------- encoding (extraction, demo)

def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """uint8 `(H, W, 3)` RGB -> JPEG bytes (simplejpeg when present, else Pillow)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(image, quality=quality, colorspace="RGB", colorsubsampling="420")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def encode_b64_jpeg(image: np.ndarray, quality: int = 90) -> str:
    return base64.b64encode(encode_jpeg(image, quality)).decode("ascii")
