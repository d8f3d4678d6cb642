"""``LayerGroup``: the decode drops of a cache's like layers, run as one batch after the last layer.

A decode step that drops one token per layer costs each layer the same ~80 small tensor
operations (score pooling, the slot move, the bookkeeping of slots, positions and lag runs),
whatever the model's size: per-operation overhead (dispatch on a CPU, kernel launches on a
GPU) dominates it. Nothing in a layer's drop is needed before that layer's next forward, so the
group defers each layer's drop until the last layer has attended, then stacks the layers along
the batch axis and drops once for all: the same operations on ``layers x batch`` rows. The
grouped layers' keys and values live in one buffer ([layers, B, H, capacity, D]; each layer's
store views its slice), so slot moves and key rotations run on it in place; the small per-slot
tensors are stacked for the step and each layer takes its rows back as views.

Every operation of a drop acts on each row alone, so a grouped drop keeps, moves and rotates
exactly what each layer's own drop would (the tests compare them bit for bit). A step runs as
a group only when every layer drops one token and their shapes and counters agree; any other
step evicts layer by layer.
"""

from __future__ import annotations

import torch

from .slots import SlotStore


class LayerGroup:
    """The decode drops of a cache's ``count`` layers (sharing one policy object), batched.

    The group holds its layers only while their drops wait within one step (each layer knows its
    ``group_index``), so a cache nobody uses any more is freed at once, not left to the cycle
    collector with its buffers.
    """

    def __init__(self, count: int):
        self.count = count
        self.waiting: list[tuple[object, torch.Tensor | None]] = []  # (layer, per-slot scores) this step
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # [layers, B, H, capacity, D]
        self._slices: list[tuple[torch.Tensor, torch.Tensor]] = []  # the buffers each layer's store views
        self._batched = None  # the EvictingLayer that holds every layer's rows during a grouped drop
        self.drops = 0  # steps whose drops ran as one batch

    def defer(self, layer, scores: torch.Tensor | None) -> bool:
        """Take ``layer``'s drop of this decode step (``scores`` per slot) for the batch; False (the
        layer evicts alone) when it is no one-token drop or comes out of turn."""
        if not layer.drops_one() or layer.group_index != len(self.waiting):
            self.flush()
            return False
        self.waiting.append((layer, scores))
        if len(self.waiting) == self.count:
            self._run()
        return True

    def settle(self, layer) -> None:
        """Before ``layer`` stores new tokens: run the deferred drops if its own is among them."""
        if any(waiting is layer for waiting, _ in self.waiting):
            self.flush()

    def flush(self) -> None:
        """Each deferred layer drops alone (a step that cannot run as a group)."""
        waiting, self.waiting = self.waiting, []
        for layer, scores in waiting:
            with layer.stats.timer():
                layer.evict_now(layer.ordered(scores))

    def release(self) -> None:
        """Forget deferred drops and shared buffers (the cache was reset)."""
        self.waiting, self._buffers, self._slices, self._batched = [], None, [], None

    def _run(self) -> None:
        layers = [layer for layer, _ in self.waiting]
        scores = [score for _, score in self.waiting]
        expected = signature(layers[0])
        if any(signature(layer) != expected for layer in layers[1:]):
            self.flush()
            return
        self._share_buffers(layers)
        batched = self._stack(layers)
        dropped = batched.step_one(None if scores[0] is None else batched.in_order(torch.cat(scores)))
        if dropped is None:  # the policy declined (its state is untouched): each layer decides alone
            self.flush()
            return
        self.waiting = []
        batched.drop_one(dropped)
        unstack(batched, layers)
        self.drops += 1

    def _share_buffers(self, layers: list) -> None:
        """Move the layers' keys, then their values, into one buffer each, unless they are there
        already. Done once per cache (or after a layer's buffer was replaced): while the keys
        move, the keys are held twice, then the values, each layer's old buffer freed as it moves."""
        if len(self._slices) == len(layers) and all(
            layer.store._keys is keys and layer.store._values is values
            for layer, (keys, values) in zip(layers, self._slices, strict=True)
        ):
            return
        self._buffers, self._slices, self._batched = None, [], None  # an old shared buffer goes first
        buffers = []
        for name, view in (("_keys", "keys"), ("_values", "values")):
            like = getattr(layers[0].store, name)
            buffer = like.new_empty((len(layers), *like.shape))
            for i, layer in enumerate(layers):
                buffer[i].copy_(getattr(layer.store, name))
                setattr(layer.store, name, buffer[i])
                setattr(layer, view, getattr(layer.store, view))  # the layer's old buffer is freed here
            buffers.append(buffer)
        self._buffers = (buffers[0], buffers[1])
        self._slices = [(layer.store._keys, layer.store._values) for layer in layers]

    def _stack(self, layers: list):
        """The batched layer, holding every layer's rows (layer-major) for this step's drop."""
        first = layers[0]
        batched = self._batched
        if batched is None:
            rotation = None if first.shift is None else first.shift.rotation
            batched = self._batched = type(first)(first.policy, rotation=rotation)
            batched.is_initialized, batched.device, batched.evicted = True, first.device, True
            keys, values = (buffer.flatten(0, 1) for buffer in self._buffers)
            batched.store = SlotStore.over(keys, values, first.store.n, first.store.limit)
        batched.store.n, batched.seen = first.store.n, first.seen
        batched.keys, batched.values = batched.store.keys, batched.store.values
        batched.positions = _cat([layer.positions for layer in layers])
        batched.order = _cat([layer.order for layer in layers])
        batched.key_norms = _cat([layer.key_norms for layer in layers])
        batched.state.scores = _cat([layer.state.scores for layer in layers])
        batched.state.forwards = first.state.forwards
        if first.shift is not None:
            shift = batched.shift
            shift.lag = _cat([layer.shift.lag for layer in layers])
            shift.key_class = _cat([layer.shift.key_class for layer in layers])
            shift.drops = first.shift.drops
        return batched


def group_of(layers: list) -> LayerGroup | None:
    """A group for a cache's layers when their drops can be batched: two or more layers running
    one policy object that drops single tokens, and one RoPE (or none) for their shifted keys."""
    first = layers[0]
    if len(layers) < 2 or not first.policy.evicts or first.policy.drop_size() is None:
        return None
    if any(layer.policy is not first.policy or (layer.shift is None) != (first.shift is None) for layer in layers):
        return None
    if first.shift is not None:
        inv_freq = first.shift.rotation.inv_freq
        if any(not torch.equal(layer.shift.rotation.inv_freq, inv_freq) for layer in layers):
            return None
    return LayerGroup(len(layers))


def signature(layer) -> tuple:
    """What must agree between layers for one stacked drop: shapes and counters."""
    shift, state = layer.shift, layer.state
    return (
        layer.keys.shape,
        layer.store.capacity,
        layer.seen,
        layer.positions.shape,
        _shape(layer.order),
        _shape(layer.key_norms),
        _shape(state.scores),
        state.forwards,
        shift and (_shape(shift.lag), _shape(shift.key_class), shift.drops),
    )


def unstack(batched, layers: list) -> None:
    """Give each layer its rows of ``batched`` (views) after the stacked drop."""
    rows, count = layers[0].keys.shape[0], len(layers)
    positions, order, norms, scores = (
        _split(tensor, rows, count)
        for tensor in (batched.positions, batched.order, batched.key_norms, batched.state.scores)
    )
    shift = batched.shift
    if shift is not None:
        lags, classes = _split(shift.lag, rows, count), _split(shift.key_class, rows, count)
    kept = batched.store.n
    for i, layer in enumerate(layers):
        layer.positions, layer.order, layer.key_norms, layer.state.scores = positions[i], order[i], norms[i], scores[i]
        state = batched.state
        layer.state.forwards, layer.state.n_real, layer.state.ragged = state.forwards, state.n_real, state.ragged
        if shift is not None:
            layer.shift.lag, layer.shift.key_class, layer.shift.drops = lags[i], classes[i], shift.drops
        layer.store.n = kept
        layer.keys, layer.values = layer.store.keys, layer.store.values
        layer.evicted = True
        layer.stats.count_forward(kept)


def _shape(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.shape


def _cat(tensors: list) -> torch.Tensor | None:
    return None if tensors[0] is None else torch.cat(tensors)


def _split(tensor: torch.Tensor | None, rows: int, count: int):
    """``tensor``'s layer-major rows, ``rows`` for each of ``count`` layers (views); Nones for None."""
    return [None] * count if tensor is None else tensor.split(rows)
