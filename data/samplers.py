"""An evaluation sampler that shards a split over ranks without padding."""

from __future__ import annotations

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
