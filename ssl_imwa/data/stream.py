"""Endless training batches from resident uint8 tensors, reproducible and resumable.

Images stay on the target device as uint8; each batch is sampled, augmented and
normalised there. All randomness lives in three CPU generators (labeled order, unlabeled
order, augmentation) seeded from (seed, replica, episode), so saving their states is
enough to continue a run bit-identically. A step plans all its sampling and augmentation on
the host first and sends the parameters to the device in one non-blocking copy, so the host
never waits for the device.
"""

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from ssl_imwa.data.transforms import (
    ParameterBuffer,
    Slot,
    StrongPlan,
    WeakPlan,
    apply_strong,
    apply_weak,
    normalize,
    plan_strong,
    plan_weak,
)


def _derive_seeds(seed: int, replica: int, episode: int) -> list[int]:
    """Four independent 63-bit seeds for (labeled sampler, unlabeled sampler, augmentation, labeled strong
    augmentation). SeedSequence's i-th child does not depend on how many are spawned: the first three are
    what they were before the fourth was added."""
    children = np.random.SeedSequence([seed, replica, episode]).spawn(4)
    return [int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)) for child in children]


# The augmentations of a class-balanced labeled batch (TrainStream's `balanced`); None: no such batch.
BALANCED_VIEWS = (None, "weak", "strong")


def _balanced_seed(seed: int, replica: int, episode: int) -> int:
    """The class-balanced labeled batch's seed: the fifth child of `_derive_seeds`' sequence (the first four are
    unchanged by it)."""
    child = np.random.SeedSequence([seed, replica, episode]).spawn(5)[4]
    return int(child.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


class InfiniteSampler:
    """Endless sequence of indices in [0, n): one fresh permutation per epoch, no index repeated within an epoch."""

    def __init__(self, n: int, generator_seed: int) -> None:
        if n <= 0:
            raise ValueError(f"cannot sample from an empty set (n={n})")
        self.n = n
        self.generator = torch.Generator().manual_seed(generator_seed)
        self.epoch = 0
        self.permutation = torch.randperm(n, generator=self.generator)
        self.position = 0

    def next_indices(self, k: int) -> torch.LongTensor:
        """The next k indices, crossing into new epochs (and reshuffling) as often as needed."""
        pieces = []
        while k > 0:
            if self.position == self.n:
                self.permutation = torch.randperm(self.n, generator=self.generator)
                self.position = 0
                self.epoch += 1
            take = min(k, self.n - self.position)
            pieces.append(self.permutation[self.position : self.position + take])
            self.position += take
            k -= take
        return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "epoch": self.epoch,
            "permutation": self.permutation.clone(),
            "position": self.position,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["n"] != self.n:
            raise ValueError(f"sampler state is for {state['n']} items, this sampler has {self.n}")
        self.epoch = state["epoch"]
        self.permutation = state["permutation"].clone()
        self.position = state["position"]
        self.generator.set_state(state["generator"])


def _check_stream_arguments(batch_size: int, shard: tuple[int, int], mu: int, num_strong: int,
                            num_labeled_strong: int, unlabeled: tuple[torch.Tensor, ...]) -> None:
    """Refuse a stream that could not make the batches it is asked for, naming the argument."""
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    index, count = shard
    if not 0 <= index < count or batch_size % count:
        raise ValueError(f"shard {index} of {count}: expected 0 <= index < count and count dividing "
                         f"batch_size={batch_size}")
    if mu < 0 or num_strong < 0 or num_labeled_strong < 0:
        raise ValueError(f"mu, num_strong and num_labeled_strong must be >= 0, got mu={mu}, num_strong={num_strong}, "
                         f"num_labeled_strong={num_labeled_strong}")
    if mu > 0 and len(unlabeled[0]) == 0:
        raise ValueError(f"mu={mu} asks for unlabeled batches, but the unlabeled set is empty")
    if len({len(part) for part in unlabeled}) > 1:
        raise ValueError("unlabeled images, targets and is_labeled flags must have the same length")


class TrainStream:
    """Labeled weak views plus unlabeled weak and `num_strong` strong views per step.

    The stream does not know why a caller wants a number of strong views; it only makes them.
    With mu == 0 the unlabeled entries are empty tensors, so supervised-only code can share
    the same batch layout.
    """

    def __init__(
        self,
        labeled_images: torch.Tensor,
        labeled_targets: torch.Tensor,
        unlabeled_images: torch.Tensor,
        unlabeled_targets: torch.Tensor,
        unlabeled_is_labeled: torch.Tensor,
        batch_size: int,
        mu: int,
        num_strong: int,
        mean: Sequence[float],
        std: Sequence[float],
        pad: int,
        hflip: bool,
        cutout: int,
        seed: int,
        replica: int,
        episode: int,
        device: str | torch.device = "cpu",
        shard: tuple[int, int] = (0, 1),
        num_labeled_strong: int = 0,
        balanced: str | None = None,
        host_labeled_targets: torch.Tensor | None = None,
    ) -> None:
        _check_stream_arguments(batch_size, shard, mu, num_strong, num_labeled_strong,
                                (unlabeled_images, unlabeled_targets, unlabeled_is_labeled))
        self.device = torch.device(device)
        (self.labeled_images, self.labeled_targets, self.unlabeled_images, self.unlabeled_targets,
         self.unlabeled_is_labeled) = (tensor.to(self.device) for tensor in (
            labeled_images, labeled_targets, unlabeled_images, unlabeled_targets, unlabeled_is_labeled))
        self.batch_size = batch_size
        self.mu = mu
        self.num_strong = num_strong
        self.num_labeled_strong = num_labeled_strong
        if balanced not in BALANCED_VIEWS:
            raise ValueError(f"balanced={balanced!r}: expected one of {BALANCED_VIEWS}")
        self.balanced = balanced
        # The labeled classes on the host, so a class-balanced draw and a dataset pass never read the device.
        self._host_labeled_targets = host_labeled_targets
        if balanced is not None:
            classes = self.labeled_classes_on_host()
            self.balanced_weights = 1.0 / torch.bincount(classes)[classes].double()
        self.mean = list(mean)
        self.std = list(std)
        self.pad = pad
        self.hflip = hflip
        self.cutout = cutout
        self.seed = seed
        self.shard = shard
        self.reseed(replica, episode)

    def _rows(self, count: int) -> slice:
        """This shard's rows of a batch of `count`: the data-parallel process's contiguous slice."""
        index, shards = self.shard
        return slice(index * count // shards, (index + 1) * count // shards)

    def reseed(self, replica: int, episode: int) -> None:
        """Restart sampling and augmentation for (seed, replica, episode); the tensors stay resident."""
        self.replica = replica
        self.episode = episode
        labeled_seed, unlabeled_seed, augment_seed, labeled_strong_seed = _derive_seeds(self.seed, replica, episode)
        self.labeled_sampler = InfiniteSampler(len(self.labeled_images), labeled_seed)
        self.unlabeled_sampler: InfiniteSampler | None = (
            InfiniteSampler(len(self.unlabeled_images), unlabeled_seed) if self.mu > 0 else None
        )
        self.augment_generator = torch.Generator().manual_seed(augment_seed)
        # A generator of their own: a stream with labeled strong views draws every other batch entry as one without.
        self.labeled_strong_generator = torch.Generator().manual_seed(labeled_strong_seed)
        if self.balanced is not None:   # its own generator too: the other draws stay those of a stream without it
            self.balanced_generator = torch.Generator().manual_seed(_balanced_seed(self.seed, replica, episode))

    def next(self) -> dict[str, Any]:
        """One step's batch: x, x_strong (list), y, u_weak, u_strong (list), u_index, u_is_labeled, u_target.

        With a shard (i, n), the rows i/n to (i+1)/n of the batch the whole stream would give:
        every draw is made for the whole batch, so the data does not depend on n.
        """
        buffer = ParameterBuffer()
        labeled_count, unlabeled_count = self.batch_size, self.mu * self.batch_size
        labeled_rows, unlabeled_rows = self._rows(labeled_count), self._rows(unlabeled_count)
        generator = self.augment_generator
        labeled_slot = buffer.add(self.labeled_sampler.next_indices(labeled_count)[labeled_rows])
        labeled_shape = (labeled_count, *self.labeled_images.shape[1:])
        labeled_plan = plan_weak(generator, labeled_shape, self.pad, self.hflip, buffer, labeled_rows)
        if self.unlabeled_sampler is None:
            unlabeled_slot = buffer.add(torch.zeros(0, dtype=torch.long))
        else:
            unlabeled_slot = buffer.add(self.unlabeled_sampler.next_indices(unlabeled_count)[unlabeled_rows])
        unlabeled_shape = (unlabeled_count, *self.unlabeled_images.shape[1:])
        weak_plan = plan_weak(generator, unlabeled_shape, self.pad, self.hflip, buffer, unlabeled_rows)
        strong_plans = [
            plan_strong(generator, unlabeled_shape, self.pad, self.hflip, self.cutout, buffer, unlabeled_rows)
            for _ in range(self.num_strong)
        ]
        labeled_strong_plans = [
            plan_strong(self.labeled_strong_generator, labeled_shape, self.pad, self.hflip, self.cutout, buffer, labeled_rows)
            for _ in range(self.num_labeled_strong)
        ]
        balanced = self._plan_balanced(buffer, labeled_shape, labeled_rows) if self.balanced is not None else None
        params = buffer.send(self.device)
        labeled_index, unlabeled_index = labeled_slot.read(params), unlabeled_slot.read(params)
        labeled = self.labeled_images.index_select(0, labeled_index)
        unlabeled = self.unlabeled_images.index_select(0, unlabeled_index)
        balanced_batch = {} if balanced is None else self._balanced_batch(*balanced, params)
        return {
            **balanced_batch,
            "x": normalize(apply_weak(labeled, labeled_plan, params), self.mean, self.std),
            "x_strong": [normalize(apply_strong(labeled, one, params), self.mean, self.std)
                         for one in labeled_strong_plans],
            "y": self.labeled_targets.index_select(0, labeled_index),
            "u_weak": normalize(apply_weak(unlabeled, weak_plan, params), self.mean, self.std),
            "u_strong": [normalize(apply_strong(unlabeled, one, params), self.mean, self.std) for one in strong_plans],
            "u_index": unlabeled_index,
            "u_is_labeled": self.unlabeled_is_labeled.index_select(0, unlabeled_index),
            "u_target": self.unlabeled_targets.index_select(0, unlabeled_index),
        }

    def _plan_balanced(self, buffer: ParameterBuffer, shape: tuple[int, ...], rows: slice
                       ) -> tuple[Slot, WeakPlan | StrongPlan]:
        """The class-balanced labeled batch's indices (with replacement, an image of class c with probability
        proportional to 1 / n_c) and augmentation, drawn for the whole batch from its own generator; this
        shard's rows go into `buffer`."""
        generator = self.balanced_generator
        index = torch.multinomial(self.balanced_weights, shape[0], replacement=True, generator=generator)
        if self.balanced == "strong":
            plan: WeakPlan | StrongPlan = plan_strong(generator, shape, self.pad, self.hflip, self.cutout, buffer, rows)
        else:
            plan = plan_weak(generator, shape, self.pad, self.hflip, buffer, rows)
        return buffer.add(index[rows]), plan

    def _balanced_batch(self, slot: Slot, plan: WeakPlan | StrongPlan, params: torch.Tensor) -> dict[str, torch.Tensor]:
        """x_balanced, y_balanced: the planned class-balanced labeled batch (this shard's rows)."""
        index = slot.read(params)
        images = self.labeled_images.index_select(0, index)
        augment = apply_strong if isinstance(plan, StrongPlan) else apply_weak
        return {"x_balanced": normalize(augment(images, plan, params), self.mean, self.std),
                "y_balanced": self.labeled_targets.index_select(0, index)}

    def labeled_classes_on_host(self) -> torch.Tensor:
        """The labeled images' classes as a CPU tensor (given by the data, else copied once from the device)."""
        if self._host_labeled_targets is None:
            self._host_labeled_targets = self.labeled_targets.cpu()
        return self._host_labeled_targets.cpu()

    def labeled_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every labeled image, unaugmented and normalised, in index order (a dataset pass's labeled half)."""
        for images, _ in eval_batches(self.labeled_images, self.labeled_targets, batch_size, self.mean, self.std,
                                      self.device):
            yield images

    def unlabeled_batches(self, batch_size: int) -> Iterator[torch.Tensor]:
        """Every unlabeled image, unaugmented and normalised, in index order: what a pass of a model over
        the unlabeled set reads (the whole set on every shard)."""
        for images, _ in eval_batches(self.unlabeled_images, self.unlabeled_targets, batch_size, self.mean, self.std,
                                      self.device):
            yield images

    def __iter__(self) -> "TrainStream":
        return self

    def __next__(self) -> dict[str, Any]:
        return self.next()

    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "replica": self.replica,
            "episode": self.episode,
            "labeled_sampler": self.labeled_sampler.state_dict(),
            "unlabeled_sampler": None if self.unlabeled_sampler is None else self.unlabeled_sampler.state_dict(),
            "augment_generator": self.augment_generator.get_state(),
            **({"labeled_strong_generator": self.labeled_strong_generator.get_state()}
               if self.num_labeled_strong else {}),
            **({"balanced_generator": self.balanced_generator.get_state()} if self.balanced is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the saved stream stopped (same data and batch shape expected)."""
        if (state["unlabeled_sampler"] is None) != (self.unlabeled_sampler is None):
            raise ValueError("stream state and this stream disagree on whether unlabeled batches are drawn (mu == 0)")
        self.seed = state["seed"]
        self.reseed(state["replica"], state["episode"])
        self.labeled_sampler.load_state_dict(state["labeled_sampler"])
        if self.unlabeled_sampler is not None:
            self.unlabeled_sampler.load_state_dict(state["unlabeled_sampler"])
        self.augment_generator.set_state(state["augment_generator"])
        if self.num_labeled_strong:
            self.labeled_strong_generator.set_state(state["labeled_strong_generator"])
        if self.balanced is not None:
            self.balanced_generator.set_state(state["balanced_generator"])


def eval_batches(
    images: torch.Tensor,
    targets: torch.Tensor,
    batch_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: str | torch.device = "cpu",
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised, unaugmented batches in order, for evaluation."""
    for start in range(0, len(images), batch_size):
        stop = start + batch_size
        yield normalize(images[start:stop].to(device), mean, std), targets[start:stop].to(device)
