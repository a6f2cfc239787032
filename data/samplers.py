"""Samplers: an evaluation sampler that shards a split over ranks without padding, and DeiT's repeated
augmentation for training."""

from __future__ import annotations

import numpy as np
from timm.data.distributed_sampler import RepeatAugSampler
from torch.utils.data import Sampler


class ShardSampler(Sampler[int]):
    """Rank r reads indices r, r + W, r + 2W, ... of the split, each index exactly once overall.

    torch's DistributedSampler pads the last shard with repeats so that every rank gets the same
    count; counting metrics (accuracy) would then depend on the world size. Without padding, sums of
    per-rank counts equal the single-process numbers exactly.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        self.n, self.num_replicas, self.rank = len(dataset), num_replicas, rank

    def __iter__(self):
        return iter(range(self.rank, self.n, self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.num_replicas))


class RepeatedAugSampler(RepeatAugSampler):
    """DeiT's repeated augmentation (RASampler) as timm implements it, with the run's seed in the shuffle.

    Each epoch shuffles the split, repeats every index ``num_repeats`` times in a row and deals the list out
    round-robin, so the copies of one image land on different ranks (with one process: in the same batch), each
    with its own augmentation. An epoch keeps DeiT's length, about one pass of samples over all ranks
    (``len(dataset) // 256 * 256 / world`` per rank; small splits skip the rounding), so it covers about
    ``1 / num_repeats`` of the distinct images. Used in single-process training too, which DeiT does not.
    timm seeds the shuffle with the epoch alone; here (seed, epoch) decide it, so that runs with other seeds
    see other orders and a resumed run the same one.
    """

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, num_repeats: int = 3, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is outside [0, {num_replicas})")
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, num_repeats=num_repeats)
        self.seed = int(seed)
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        # timm seeds torch's generator with ``self.epoch``: give it a number drawn from (seed, epoch).
        super().set_epoch(int(np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1, np.uint32)[0]))
