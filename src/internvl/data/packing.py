"""Sample packing (the official `--use_packed_ds`): a stream of packs, each several samples of at most
`max_packed_tokens` tokens and `num_images_expected` tiles in all, for `Collator(pack=True)`.

As the official `PackedDataset`, it is an iterable dataset read in a seeded order, each DataLoader worker of each
rank taking its own share of the samples (`rank * workers + worker` of `world_size * workers`), and the packing
is greedy over a few open packs: a sample goes into the fullest open pack it fits in, else opens one; a pack
leaves as soon as it is full (no sample as small as the smallest seen so far would fit it, by tokens or tiles),
and the oldest leaves while more than `max_buffer_size` are open. With `replacement` the order starts over,
reshuffled, when every sample was read (the stream never ends: `--max_steps` says how long to train); without it
the stream ends after one pass, with the open packs.

Unlike the official one, a sample is never cut across packs: the samples are truncated to `max_packed_tokens`
when they are built, as the official dataset's `max_tokens` is capped at it, so each fits in a pack of its own.
The order and the packs depend only on the seed, the pass and the number of workers: a resumed run (the Trainer
skips the batches already trained on) sees the packs an uninterrupted run would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

from internvl.data.collate import Sample, sample_tiles
from internvl.data.dataset import InternVLDataset

logger = logging.getLogger(__name__)


@dataclass(eq=False)  # packs are told apart by identity (comparing their tensors would be ambiguous)
class OpenPack:
    """A pack being filled: its samples and their tokens and tiles."""

    samples: list[Sample] = field(default_factory=list)
    tokens: int = 0
    tiles: int = 0

    def add(self, sample: Sample) -> None:
        """Put the sample in this pack."""
        self.samples.append(sample)
        self.tokens += len(sample["input_ids"])
        self.tiles += sample_tiles(sample)


@dataclass
class GreedyPacker:
    """The packing rule, apart from where samples come from: `add` a sample, get back the packs it completed."""

    max_tokens: int
    max_tiles: int
    max_open: int
    open: list[OpenPack] = field(default_factory=list)
    smallest: tuple[int, int] | None = None  # the fewest tokens and tiles of any sample seen

    def add(self, sample: Sample) -> list[list[Sample]]:
        """Pack the sample; returns the packs that are done (full, or the oldest over `max_open`)."""
        tokens, tiles = len(sample["input_ids"]), sample_tiles(sample)
        self.smallest = (tokens, tiles) if self.smallest is None else (
            min(self.smallest[0], tokens), min(self.smallest[1], tiles))
        if tokens > self.max_tokens:
            raise ValueError(f"a sample of {tokens} tokens cannot fit in a pack of {self.max_tokens}; build samples "
                             "with max_seq_length at most max_packed_tokens")
        fitting = [pack for pack in self.open
                   if pack.tokens + tokens <= self.max_tokens and pack.tiles + tiles <= self.max_tiles]
        if fitting:
            pack = max(fitting, key=lambda candidate: candidate.tokens)
        else:
            if tiles > self.max_tiles:
                logger.warning("a sample of %d tiles is more than --num_images_expected %d: it is packed alone",
                               tiles, self.max_tiles)
            pack = OpenPack()
            self.open.append(pack)
        pack.add(sample)
        done = []
        # Full: no sample as small as the smallest seen would fit any more (officially: exactly full, which a
        # pack of real samples rarely is, so packs waited for the buffer to overflow).
        if (self.max_tokens - pack.tokens < self.smallest[0]) or (self.max_tiles - pack.tiles < self.smallest[1]):
            self.open.remove(pack)
            done.append(pack.samples)
        while len(self.open) > self.max_open:
            done.append(self.open.pop(0).samples)
        return done

    def flush(self) -> list[list[Sample]]:
        """Every open pack, oldest first; the packer is empty afterwards."""
        done, self.open = [pack.samples for pack in self.open], []
        return done


class PackedDataset(IterableDataset):
    """Packs (lists of samples) of an `InternVLDataset`, per the official packing options; see the module."""

    def __init__(self, dataset: InternVLDataset, max_packed_tokens: int = 8192, num_images_expected: int = 40,
                 max_buffer_size: int = 20, replacement: bool = True, log_freq: int = 1000, seed: int = 0,
                 rank: int = 0, world_size: int = 1):
        if max_packed_tokens < 1 or num_images_expected < 1 or max_buffer_size < 1:
            raise ValueError("max_packed_tokens, num_images_expected and max_buffer_size must be positive")
        self.dataset = dataset
        self.max_packed_tokens = max_packed_tokens
        self.num_images_expected = num_images_expected
        self.max_buffer_size = max_buffer_size
        self.replacement = replacement
        self.log_freq = log_freq
        self.seed = seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Start the stream at pass `epoch` (the Trainer's epochs, when a stream without replacement ends)."""
        self.epoch = epoch

    def _share(self) -> tuple[int, int]:
        """(this reader's number, how many readers): one per DataLoader worker of each rank."""
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker else (1, 0)
        return self.rank * workers + worker_id, self.world_size * workers

    def order(self, epoch: int) -> np.ndarray:
        """This reader's sample indices of one pass, shuffled by (seed, pass)."""
        reader, readers = self._share()
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))[reader::readers]

    def __iter__(self) -> Iterator[list[Sample]]:
        packer = GreedyPacker(self.max_packed_tokens, self.num_images_expected, self.max_buffer_size)
        reader, _ = self._share()
        made = filled = 0
        epoch = self.epoch
        while True:
            order = self.order(epoch)
            if not len(order):  # more readers than samples: this one has none, and ends at once
                break
            for index in order:
                for pack in packer.add(self.dataset.get(int(index), epoch)):
                    made += 1
                    filled += sum(len(sample["input_ids"]) for sample in pack)
                    if reader == 0 and self.log_freq and made % self.log_freq == 0:
                        logger.info("packing: %d packs, %.0f%% of max_packed_tokens filled on average, %d open",
                                    made, 100 * filled / (made * self.max_packed_tokens), len(packer.open))
                    yield pack
            if not self.replacement:
                break
            epoch += 1
        yield from packer.flush()
