"""``beitfast bench --data``: the input pipeline alone and the tokenizer alone, one JSON line each.

The images are JPEGs written from the embedded photographs (longer side ``max_side``, 500 by default:
ImageNet's typical 500x375), read from a folder as in training. Paths:

* ``pil``: today's path, ``TwoViewTransform`` (PIL; jitter on the whole image) and one Python mask
  generator per sample; the reference;
* ``fast-cpu``: ``FastPretrainSample`` (pipeline.py) and the native batch mask generator;
* ``device-<type>``: the device input path of training (``DevicePretrainSample``: the files read and
  the augmentation drawn on the host, decoded by nvJPEG and augmented by ``DeviceTwoView`` on a GPU),
  as the trainer runs it; measured on a GPU only unless asked for (on CPU it is a test reference).

``images_per_s_per_core`` is measured in this process with one thread (the median batch time, the host
paths timed batch by batch in turn; the device path: everything in this process); ``images_per_s``
with ``workers`` DataLoader processes of one thread each (the device path: they read and draw, this
process decodes and augments on the device).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from .data import (BatchStream, ImageFolder, PretrainSample, TwoViewTransform, embedded_photos, masking_for,
                   pretrain_stream)
from .pipeline import FastPretrainSample

__all__ = ["write_jpegs", "bench_paths", "bench_tokenizers"]


def write_jpegs(folder: str | os.PathLike, max_side: int = 500, quality: int = 90, enlarge: bool = False
                ) -> list[Path]:
    """The embedded photographs as JPEG files in ``folder``, their longer side at most ``max_side``;
    with ``enlarge``, exactly ``max_side`` (the smaller photographs enlarged, bicubic)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(embedded_photos(max_side=max_side).images):
        if enlarge and max(image.size) < max_side:
            scale = max_side / max(image.size)
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
        path = folder / f"photo{i:02d}.jpg"
        image.save(path, "JPEG", quality=quality)
        paths.append(path)
    return paths


def _per_core_rates(streams: list[BatchStream], batches: int) -> list[float]:
    """Images/s of each stream in this process with one thread: the batch size over the median time of
    a batch, the streams timed batch by batch in turn, so that load from other processes on the machine
    hits every path alike and its bursts do not decide the result."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    seconds: list[list[float]] = [[] for _ in streams]
    try:
        for stream in streams:
            stream.batch(0)  # warm-up: lazy imports, first allocations
        for step in range(1, batches + 1):
            for times, stream in zip(seconds, streams):
                started = time.perf_counter()
                stream.batch(step)
                times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    return [stream.local_batch_size / statistics.median(times) for stream, times in zip(streams, seconds)]


def _rate(stream: BatchStream, device: torch.device, batches: int, workers: int) -> float:
    """Images/s of ``batches`` batches made by ``workers`` DataLoader processes (one thread each, as
    DataLoader workers run) or by this process (``workers`` 0) and finished on ``device`` by
    ``stream.prepare`` (the device path decodes and augments there; the host paths have nothing left
    to do), this process on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        iterator = stream.iterate(0, workers, device)
        for _ in range(max(workers, 1)):  # every worker started, the device warm
            stream.prepare(next(iterator), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            stream.prepare(next(iterator), device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = batches * stream.local_batch_size / (time.perf_counter() - started)
    finally:
        torch.set_num_threads(threads)
    del iterator
    return rate


def bench_paths(batch_size: int = 32, batches: int = 4, workers: int | None = None, model_size: int = 224,
                tokenizer_size: int = 112, patch_size: int = 16, max_side: int = 500, device: str = "cpu",
                device_path: bool | None = None) -> list[dict]:
    """One row per input path (see the module docstring), on the same JPEGs."""
    workers = (os.cpu_count() or 1) if workers is None else workers
    device = torch.device(device)
    transform = TwoViewTransform(model_size, tokenizer_size)
    grid = (model_size // patch_size, model_size // patch_size)
    masking = masking_for(grid)
    rows = []
    with tempfile.TemporaryDirectory(prefix="beitfast-bench-") as folder:
        folder = Path(folder)
        write_jpegs(folder, max_side=max_side)
        source = ImageFolder(folder)
        paths = {"pil": PretrainSample(transform, masking), "fast-cpu": FastPretrainSample(transform, masking)}
        streams = [BatchStream(source, sample, batch_size) for sample in paths.values()]
        for path, stream, per_core in zip(paths, streams, _per_core_rates(streams, batches)):
            total = per_core
            if workers > 1:
                total = _rate(stream, torch.device("cpu"), batches * workers, workers)
            rows.append({"path": path, "images_per_s": total, "images_per_s_per_core": per_core,
                         "workers": workers})
        if device_path if device_path is not None else device.type == "cuda":
            stream = pretrain_stream(source, transform, masking, batch_size, on_device=True)
            per_core = _rate(stream, device, batches, 0)
            total = _rate(stream, device, batches, workers) if workers > 1 else per_core
            rows.append({"path": f"device-{device.type}", "images_per_s": total, "images_per_s_per_core": per_core,
                         "workers": workers})
    reference = rows[0]["images_per_s_per_core"]
    common = {"batch_size": batch_size, "images": batch_size * batches, "model_size": model_size,
              "tokenizer_size": tokenizer_size, "max_side": max_side, "device": _device_name(device)}
    for row in rows:
        row.update(common, speedup_per_core_vs_pil=row["images_per_s_per_core"] / reference)
    return rows


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def bench_tokenizers(batch_size: int = 64, batches: int = 3, input_size: int = 112, device: str = "cpu",
                     vocab_size: int = 8192, compiled: bool | None = None) -> list[dict]:
    """Tokens per second of the k-means tokenizer (8x8 patches) and the DALL-E encoder (random weights:
    the speed does not depend on them) on random views, on ``device``; with ``compiled`` (default: on
    CUDA) also the DALL-E encoder through ``torch.compile`` (``TrainConfig.compile``), compilation
    excluded from the time."""
    from .tokenizers import DalleTokenizer, KMeansTokenizer

    device = torch.device(device)
    images = torch.rand(batch_size, 3, input_size, input_size, device=device)
    tokenizers = {"kmeans": KMeansTokenizer(torch.randn(vocab_size, 3 * 8 * 8), input_size=input_size),
                  "dalle": DalleTokenizer(vocab_size=vocab_size, input_size=input_size)}
    if compiled is None:
        compiled = device.type == "cuda"
    if compiled:
        tokenizers["dalle-compiled"] = DalleTokenizer(vocab_size=vocab_size, input_size=input_size)
        tokenizers["dalle-compiled"].encoder.compile()
    rows = []
    for name, tokenizer in tokenizers.items():
        tokenizer.to(device)
        tokenizer.tokenize(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            tokenizer.tokenize(images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rate = batches * batch_size / (time.perf_counter() - started)
        rows.append({"path": f"tokenizer-{name}", "images_per_s": rate, "batch_size": batch_size,
                     "input_size": input_size, "vocab_size": vocab_size, "device": _device_name(device),
                     "threads": torch.get_num_threads()})
    return rows
