"""The data of a run: a split's datasets from its `data.<split>` sources, seeded samples, DataLoaders.

`build_split` is the generic builder behind `Task.build_datasets`: one dataset of the task's class
per source, mixed by the sources' weights. `SeededSamples` makes training augmentation a function of
(seed, epoch, index) for exact resume. `data_loader` holds the DataLoader settings every loader of a
run shares. What needs higher floors (sidecar target stores, the preemption guard) is handed in by
the caller as `collate_fn` / `worker_init_fn`.
"""

from __future__ import annotations

import inspect
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Subset

from violet_ds.config import DataConfig, DataSource
from violet_ds.data.datasets import ClipReader, MixedDataset, VideoTextDataset, collate


class SeededSamples(Dataset):
    """Runs each sample's random augmentation under a seed made of (run seed, epoch, sample index).

    A sample then looks the same whichever DataLoader worker loads it and whether or not the run was
    interrupted and resumed, which exact resume needs; the caller's RNG streams are left untouched.
    """

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        sample_seed = (self.seed * 1_000_003 + self.epoch * 100_003 + int(index)) % 2**63
        python_state, numpy_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            # the CPU generator only: torch.manual_seed would also seed (and lazily initialise) every
            # accelerator generator, ~10% of a sample's loading time; samples draw on the CPU
            torch.default_generator.manual_seed(sample_seed)
            random.seed(sample_seed)
            np.random.seed(sample_seed % 2**32)
            try:
                return self.dataset[index]
            finally:
                random.setstate(python_state)
                np.random.set_state(numpy_state)

    def __getattr__(self, name: str):
        # dataset attributes (vocab, classes, ...) stay reachable through the wrapper
        if name in ("dataset", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_split(dataset_class: type, data: DataConfig, tokenizer, split: str) -> Dict[str, Dataset]:
    """`{split: dataset}`: one `dataset_class` per source of `data.<split>`, mixed by the sources' weights.

    Every dataset class takes `(tsv, annotations, split, tokenizer)` and the clip options of `data`;
    a source's `kind` and `vq` are passed to the classes that accept them. An empty split gives `{}`.
    """
    sources = getattr(data, split)
    if not sources:
        return {}
    accepted = inspect.signature(dataset_class.__init__).parameters
    parts = []
    for source in sources:
        options = dict(num_frames=data.num_frames, size=data.image_size, max_text_len=data.max_text_len,
                       train=split == "train", decoder=data.jpeg_decoder, max_bad_fraction=data.max_bad_fraction,
                       frame_order=data.frame_order)
        if "kind" in accepted:
            options["kind"] = source.kind
        if "vq" in accepted:
            options["vq"] = source.vq
            if source.vq:
                # DALL-E tokens describe the whole stored frame: read it resized, not cropped
                options["spatial"] = "resize"
        parts.append(dataset_class(source.tsv, source.annotations, source.split, tokenizer, **options))
    if len(parts) == 1 and sources[0].weight == 1.0:
        return {split: parts[0]}
    return {split: MixedDataset(parts, [source.weight for source in sources])}


def sidecar_paths(source: DataSource) -> List[str]:
    """The pre-extracted target folders a source names (`targets:`, comma-separated)."""
    return [part.strip() for part in (source.targets or "").split(",") if part.strip()]


def _source_parts(dataset: Dataset, sources: Sequence[DataSource]) -> List[Tuple[Dataset, Optional[DataSource]]]:
    """(dataset part, its DataSource or None when the parts cannot be matched to the sources)."""
    parts = list(dataset.datasets) if isinstance(dataset, MixedDataset) else [dataset]
    if len(parts) == len(sources):
        return list(zip(parts, sources))
    return [(part, None) for part in parts]


def read_clips_as_extracted(datasets: Mapping[str, Dataset], data: DataConfig, split: str) -> None:
    """Make the clips of the split's sources with `targets:` sidecars read the way extraction read them.

    A stored target is right only for the clip extraction saw: evenly spaced segment-centre frames,
    short-side resize + centre crop, no flip. Readers of sources with sidecars (all readers when the
    datasets cannot be matched to sources) switch to `sampling="fixed"`; a source whose clips are not
    centre crops (e.g. `spatial="resize"` for VQ tokens) or whose short rows are not stretched
    (`short="repeat"`) is refused.
    """
    sources = getattr(data, split)
    for dataset in datasets.values():
        for part, source in _source_parts(dataset, sources):
            if source is not None and not sidecar_paths(source):
                continue
            reader = getattr(part, "reader", None)
            if not isinstance(reader, ClipReader):
                continue
            where = f"data.{split} source {source.tsv!r}" if source is not None else f"data.{split}"
            mode = reader.transform.mode
            if mode != "crop":
                raise ValueError(f"{where}: its clips use spatial={mode!r} but `targets:` sidecars were extracted "
                                 "from short-side resize + centre crop (spatial='crop'); drop `targets` (or `vq`) "
                                 "from that source")
            if reader.short != "repeat":
                raise ValueError(f"{where}: short rows use short={reader.short!r} but `targets:` sidecars were "
                                 "extracted with short='repeat'")
            if reader.random_clip:
                part.reader = ClipReader(reader.num_frames, reader.size, reader.train, mode, reader.transform.flip,
                                         reader.decoder, reader.short, reader.transform.scale, sampling="fixed",
                                         frame_order=reader.frame_order)


def data_loader(dataset: Dataset, sampler, data: DataConfig, batch_size: int, *, seed: int, drop_last: bool,
                pin_memory: bool, collate_fn: Callable = collate,
                worker_init_fn: Optional[Callable[[int], Any]] = None,
                loader_class: Callable[..., DataLoader] = DataLoader) -> DataLoader:
    """The DataLoader of a run: `data.num_workers` workers (`worker_init_fn` runs in each), a generator
    seeded with `seed`, batches pinned when `pin_memory` (and `data.pin_memory`), no persistent workers.
    `loader_class`: a DataLoader subclass or a callable building one (the run's preemption-safe one, with
    its `data.loader_timeout_s` watchdog)."""
    generator = torch.Generator()
    generator.manual_seed(seed)
    workers = data.num_workers
    return loader_class(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
                      worker_init_fn=worker_init_fn if workers > 0 else None,
                      pin_memory=data.pin_memory and pin_memory, drop_last=drop_last, generator=generator,
                      prefetch_factor=data.prefetch_factor if workers > 0 else None, persistent_workers=False)


def reading_datasets(dataset: Dataset) -> List[VideoTextDataset]:
    """The datasets inside `dataset` that read samples (and count the unreadable ones), through the wrappers a
    run puts around them: SeededSamples, MixedDataset and torch's Subset / ConcatDataset."""
    if isinstance(dataset, (SeededSamples, Subset)):
        return reading_datasets(dataset.dataset)
    if isinstance(dataset, (MixedDataset, ConcatDataset)):
        return [part for sub in dataset.datasets for part in reading_datasets(sub)]
    return [dataset] if isinstance(dataset, VideoTextDataset) else []
