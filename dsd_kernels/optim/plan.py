"""A masked optimizer's step plan: a param group's checked and bucketed step, kept while
nothing it was built from changes (docs/design.md, Step plans)."""

from collections.abc import Mapping
from itertools import chain, compress
from operator import is_, itemgetter

import torch

from .. import host
from ..distributed import local_tensor

PLAIN = {torch.Tensor, torch.nn.Parameter}  # types the kernels take as they are


class Bucket:
    """The tensors of one fused launch, as the kernels see them (an FSDP2 parameter's local
    shard): a group's params with gradients on one device, for SGD also of one kind of step."""

    def __init__(self, device: torch.device, key, states: int):
        self.device, self.key = device, key
        self.positions = []  # where its params are in the group's list of those with gradients
        self.params, self.masks, self.state_dicts = [], [], []
        self.states = [[] for _ in range(states)]  # per entry of the optimizer's _read_state
        self.counts = None  # Adam's step counts as one tensor, when _shared_counts made it

    def to_local(self) -> bool:
        """Replace DTensors by their local shards; whether every tensor was plain already."""
        plain = True
        for tensors in (self.params, *self.states):
            if not set(map(type, tensors)) <= PLAIN:
                local = list(map(local_tensor, tensors))
                plain &= all(map(is_, local, tensors))
                tensors[:] = local
        return plain


class Plan:
    """A param group's checked and bucketed step, reused by the next step while everything
    it was built from is unchanged (`matches`): a training loop then pays a few passes in C
    over the group's tensors per step instead of the checks and bucketing in Python.

    A plan holds what it was built from, so none of it is freed and its id reused, and
    compares it by identity: the group and its params, the masks dict (set_masks, clear_masks
    and load_state_dict assign a new one, never change one), each param's state dict and
    every state tensor the step reads. The kinds of the params and gradients (`kinds`:
    which params have a gradient, Python types, layouts, devices and dtypes; `p.data = ...`
    changes those of the same object) are compared as a key. Gradients are taken anew on
    every step; lr, betas, weight decay and the other hyper-parameters are read by every
    launch and are no part of a plan.
    """

    def __init__(self, optimizer, group, grads, has_grad, present, buckets, reusable):
        self.has_grad, self.buckets, self.reusable = has_grad, buckets, reusable
        if reusable:  # what `matches` compares
            self.group, self.params = group, list(group["params"])
            self.masks = optimizer._masks
            self.kinds = host.tensor_kinds([self.params, grads])
            self.present, self.present_dicts = present, [optimizer.state[p] for p in present]
            self._remember_state(optimizer.state)
            self.state_names = optimizer._read_state(group)
            self.state = state_tensors(self.present_dicts, self.state_names)

    def matches(self, optimizer, group: dict, grads: list) -> bool:
        """Would a plan built now for this group and these gradients be this one?"""
        params, state = group["params"], optimizer.state
        if (group is not self.group or optimizer._masks is not self.masks
                or len(params) != len(self.params) or not all(map(is_, params, self.params))
                or host.tensor_kinds([params, grads]) != self.kinds
                or optimizer._read_state(group) != self.state_names):
            return False
        # The state as the plan last saw it (the same keys and dicts in the same order) holds
        # the dicts the plan read, known without a lookup per param (each hashes a tensor in
        # Python); after any other change (another group's new entries) they are looked up.
        if (state is not self.state_mapping or len(state) != len(self.state_keys)
                or not all(map(is_, state, self.state_keys))
                or not all(map(is_, state.values(), self.state_values))):
            if not all(map(is_, map(state.get, self.present), self.present_dicts)):
                return False
            self._remember_state(state)
        tensors = state_tensors(self.present_dicts, self.state_names)
        return tensors is not None and all(map(is_, tensors, self.state))

    def _remember_state(self, state: Mapping) -> None:
        self.state_mapping = state
        self.state_keys, self.state_values = list(state), list(state.values())

    def launches(self, grads: list):
        """(bucket, its gradients as the kernels see them) for this step's gradients."""
        grads = list(compress(grads, self.has_grad))
        if not self.reusable:
            grads = list(map(local_tensor, grads))
        if len(self.buckets) == 1:
            return [(self.buckets[0], grads)]
        return [(b, [grads[i] for i in b.positions]) for b in self.buckets]


def state_tensors(dicts: list, names: tuple[str, ...]) -> list | None:
    """The entries `names` of every state dict, in one list; None if one is missing."""
    if not names:
        return []
    try:
        values = list(map(itemgetter(*names), dicts))
    except KeyError:
        return None
    return list(chain.from_iterable(values)) if len(names) > 1 else values
