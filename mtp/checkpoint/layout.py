"""How one Hugging Face tensor becomes one of our parameters, shard by shard, and back.

Ours = ``transpose(reshape(hf, split), perm)``, where the reshape only splits HF axes (``[N*H, D] -> [N, H, D]``).
Because of that, any block of our array maps to one contiguous-per-axis block of the HF tensor, so a device
shard is read straight from the memory-mapped file without materialising the whole tensor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
    """An HF tensor name and the split + permutation that turn it into our parameter."""

    key: str
    hf_shape: tuple[int, ...]
    split: tuple[int, ...]
    perm: tuple[int, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.split[p] for p in self.perm)

    def groups(self) -> list[list[int]]:
        """The split axes each HF axis becomes."""
        groups, axis = [], 0
        for dim in self.hf_shape:
            group, size = [], 1
            while size < dim or not group:
                group.append(axis)
                size *= self.split[axis]
                axis += 1
            if size != dim:
                raise ValueError(f"{self.key}: split {self.split} does not refine HF shape {self.hf_shape}")
            groups.append(group)
        return groups

    def read(self, read_hf: Callable[[tuple[slice, ...]], np.ndarray], index: Sequence[slice]) -> np.ndarray:
        """Our block at ``index`` (basic slices over our shape), reading only the HF rows it needs."""
        split_index = [slice(None)] * len(self.split)
        for our_axis, split_axis in enumerate(self.perm):
            split_index[split_axis] = index[our_axis]
        split_index = [slice(*s.indices(n)[:2]) for s, n in zip(split_index, self.split, strict=True)]
        hf_index, block_shape, inner_index = [], [], []
        for group in self.groups():
            outer = split_index[group[0]]
            inner = math.prod(self.split[a] for a in group[1:])
            hf_index.append(slice(outer.start * inner, outer.stop * inner))
            block_shape += [outer.stop - outer.start, *(self.split[a] for a in group[1:])]
            inner_index += [slice(None), *(split_index[a] for a in group[1:])]
        block = read_hf(tuple(hf_index)).reshape(block_shape)[tuple(inner_index)]
        return np.transpose(block, self.perm)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """The inverse: our full array back to the HF tensor."""
        return np.transpose(ours, np.argsort(self.perm)).reshape(self.hf_shape)


def linear(key: str, out_dims: tuple[int, ...], in_dims: tuple[int, ...], *, ours_in_first: bool = True) -> Layout:
    """A torch ``Linear`` weight ``[prod(out), prod(in)]`` as ours ``[*in, *out]`` (or ``[*out, *in]``)."""
    n_out, n_in = len(out_dims), len(in_dims)
    split = (*out_dims, *in_dims)
    perm = (*range(n_out, n_out + n_in), *range(n_out)) if ours_in_first else tuple(range(n_out + n_in))
    return Layout(key, (math.prod(out_dims), math.prod(in_dims)), split, perm)


def same(key: str, shape: tuple[int, ...]) -> Layout:
    return Layout(key, shape, shape, tuple(range(len(shape))))
