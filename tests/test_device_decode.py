"""`--decode_device` (rock_dist.data.device_decode): JPEG sizes from the header, deferred decoding in the main process
giving the same batches as the workers' decoding, and the fallbacks (no CUDA device; a batch the GPU cannot decode).

On a CPU the deferred path runs with the CPU as its decode device (the code path `--decode_device cuda` takes, with
`torchvision.io.decode_jpeg` on the CPU on the same bytes); the nvJPEG comparison is the `cuda` test at the end,
run by launch/gpu_check.sh.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Mapping

import pytest
import torch
from torchvision.io import encode_jpeg

from rock_dist.data import device_decode, pipeline
from rock_dist.data.device_decode import DeviceDecoder, finish_images
from rock_dist.data.transforms import jpeg_size
from rock_dist.data.loader_spec import TrainLoaderSpec
from rock_dist.data.pipeline import make_train_loader
from rock_dist.errors import ConfigError, DataError

IMAGE_SIZE = (64, 80)
TARGET_SIZE = (8, 10)


def _stream(shard_dir: Path, **kwargs: Any) -> Any:
    return make_train_loader(TrainLoaderSpec(str(shard_dir / "train"), image_size=IMAGE_SIZE, target_size=TARGET_SIZE,
                                             batch_size=3, num_workers=0, seed=5, rank=0, world_size=1, **kwargs))


def _take(stream: Any, n: int) -> list[Mapping[str, Any]]:
    it: Iterator[Mapping[str, Any]] = iter(stream)
    return [next(it) for _ in range(n)]


def _assert_same_batches(a: list[Mapping[str, Any]], b: list[Mapping[str, Any]]) -> None:
    for x, y in zip(a, b, strict=True):
        assert sorted(x) == sorted(y)
        for key in x:
            assert torch.equal(x[key], y[key]), key


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 marks encode_jpeg deprecated
def test_jpeg_size_reads_the_frame_header() -> None:
    image = torch.randint(0, 256, (3, 37, 53), dtype=torch.uint8)
    assert jpeg_size(encode_jpeg(image).numpy().tobytes()) == (37, 53)
    grey = torch.randint(0, 256, (1, 41, 19), dtype=torch.uint8)
    assert jpeg_size(encode_jpeg(grey).numpy().tobytes()) == (41, 19)
    with pytest.raises(DataError, match="not a JPEG"):
        jpeg_size(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(DataError, match="no frame header"):
        jpeg_size(encode_jpeg(image).numpy().tobytes()[:30])


def test_deferred_decoding_gives_the_workers_batches(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The deferred path (bytes + geometry from the worker, decode + crop + flip + resize in the main process) on
    the CPU gives bit-identical batches to the workers' decoding: same crops, same pixels, same targets."""
    reference = _take(_stream(shard_dir), 4)
    monkeypatch.setattr(pipeline, "resolve_decode_device", lambda requested: torch.device("cpu"))
    deferred = _stream(shard_dir, decode_device="cuda")
    assert deferred._decoder is not None and deferred._transform.defer_decode
    raw = next(iter(deferred._make_loader()))  # what the workers ship: bytes and geometry, no images
    assert "images" not in raw and len(raw["jpeg"]) == 3 and raw["jpeg"][0].dim() == 1
    assert raw["jpeg_geometry"].shape == (3, 5)  # rows (x0, y0, x1, y1, flip)
    _assert_same_batches(reference, _take(deferred, 4))


def test_decode_device_cuda_falls_back_without_cuda(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reference = _take(_stream(shard_dir), 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="no CUDA device here; the loader workers decode the JPEGs on the CPU"):
        stream = _stream(shard_dir, decode_device="cuda")
    assert stream._decoder is None and not stream._transform.defer_decode
    _assert_same_batches(reference, _take(stream, 2))
    with pytest.raises(ConfigError, match="--color_jitter device"):
        _stream(shard_dir, decode_device="cuda", color_jitter="cpu")


def _deferred_batch(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    monkeypatch.setattr(pipeline, "resolve_decode_device", lambda requested: torch.device("cpu"))
    return dict(next(iter(_stream(shard_dir, decode_device="cuda")._make_loader())))


def test_a_batch_the_gpu_cannot_decode_falls_back_to_the_cpu(shard_dir: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _deferred_batch(shard_dir, monkeypatch)
    expected = finish_images(batch, "cpu", IMAGE_SIZE)["images"]
    real = device_decode._decode_many

    def gpu_fails(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        if device.type != "cpu":
            raise RuntimeError("nvjpeg: NVJPEG_STATUS_EXECUTION_FAILED (simulated)")
        return real(data, device)

    monkeypatch.setattr(device_decode, "_decode_many", gpu_fails)
    decoder = DeviceDecoder("cuda", IMAGE_SIZE)  # no CUDA needed: the failure comes before any transfer
    with pytest.warns(UserWarning, match="GPU could not decode a batch that the CPU could.*from now on"):
        out = decoder(batch)
    assert decoder.device.type == "cpu"
    assert torch.equal(out["images"], expected) and "jpeg" not in out


def test_a_corrupt_jpeg_is_a_data_error(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _deferred_batch(shard_dir, monkeypatch)
    broken = batch["jpeg"][1].clone()
    broken[len(broken) // 2:] = 0  # header intact (the worker accepted it), entropy-coded data destroyed
    batch["jpeg"] = [batch["jpeg"][0], broken[: len(broken) // 2 + 8], batch["jpeg"][2]]
    with pytest.raises(DataError, match="cannot be decoded"):
        DeviceDecoder("cpu", IMAGE_SIZE)(batch)


@pytest.mark.cuda
def test_nvjpeg_decoding_matches_the_cpu(shard_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU: the batched nvJPEG path gives the CPU decoder's images up to the decoders' rounding (IDCT and
    chroma upsampling differ slightly between libjpeg and nvJPEG)."""
    batch = _deferred_batch(shard_dir, monkeypatch)
    cpu = finish_images(batch, "cpu", IMAGE_SIZE)["images"]
    gpu = DeviceDecoder("cuda", IMAGE_SIZE)(batch)["images"]
    assert gpu.device.type == "cuda" and gpu.shape == cpu.shape and gpu.dtype == torch.uint8
    diff = (gpu.cpu().int() - cpu.int()).abs().float()
    other = (gpu.cpu().int() - cpu.roll(1, 0).int()).abs().float()  # another image: what "different" looks like
    assert diff.mean() < 3.0 and diff.mean() < other.mean() / 4, (diff.mean(), diff.max(), other.mean())
