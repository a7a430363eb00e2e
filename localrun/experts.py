"""ExpertStore: where routed experts live (device-resident, device cache slots, host RAM) and how a miss is served.

Shape letters: T tokens, K top-k, E experts, H hidden, I expert intermediate.

One `ExpertStore` per model; inside it one `LayerCache` per MoE layer. A layer's experts split into
- resident: on the device once, never evicted (chosen by the plan);
- host: everything else, kept in host RAM (page-locked on CUDA so copies are async DMA);
- cache slots: at most `slots` host experts live on the device at a time, replaced per a `CachePolicy`.
On a miss the `CostModel` decides per expert: copy it into a slot, or compute it on the CPU where it lies.

Memory, for payloads that are one buffer (`RowPayload`: `quant.nf4.PackedExpert`): each layer holds
one [n_resident + slots, nbytes] device tensor (resident rows, then the cache slots' rows), one
[n_host, nbytes] host tensor (`host_rows`: page-locked with cudaHostRegister on CUDA, so it pins
exactly its bytes), all allocated when the layer is added; every expert is a row view, a copy fills a slot
row in place, and nothing is allocated while decoding. `build_layer` lets the loader quantize
straight into the rows. Any other payload (tests use dataclasses of tensors) goes the generic way:
its own `.to(device)` copies.

The store never knows the precision: a payload is anything with `.nbytes` and `.to(device, non_blocking)`,
and `compute(payload, x_TH) -> y_TH` is injected. `store(layer)` is an expert backend for the decoder,
`(x_TH, ids_TK, w_TK) -> y_TH`. Host syncs: a decoded token's ids and weights reach the host in one
copy per layer (`moe.RoutingToHost`), started by `prefetch` right after the router. A prompt's layer
(with `device_prefill`, on CUDA) runs grouped GEMMs over the layer's device rows in `waves`: the experts
already on the device, then the copied ones, a wave at a time through the slots.

Bookkeeping (`LayerCache.plan`) is pure Python and separate from data movement (`ExpertStore`), so the
cache benchmark replays routing traces through the very code that decides placement, without tensors.
"""

from __future__ import annotations

import math
import mmap
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from types import MappingProxyType
from typing import Callable, Collection, Hashable, Iterable, Literal, Mapping, Protocol, Sequence

import torch

from .moe import RoutingToHost, dispatch, group_by_expert

Source = Literal["resident", "hit", "copy", "cpu"]


class Payload(Protocol):
    """One expert's weights as one movable unit (e.g. `quant.nf4.PackedExpert`)."""

    nbytes: int

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Payload": ...


class RowPayload(Payload, Protocol):
    """A payload that is one contiguous 1-D uint8 buffer and can be rebuilt over another buffer."""

    buffer: torch.Tensor

    def with_buffer(self, buffer: torch.Tensor) -> "RowPayload": ...


Compute = Callable[[Payload, torch.Tensor], torch.Tensor]  # (payload, x_TH) -> y_TH, on the payload's device


class DeviceRowsCompute(Protocol):
    """A decoded token's experts of one layer in one call on the device (quant.ffn.DeviceRowsCompute):
    `rows_RB` is the layer's [resident + slots, nbytes] device buffer, `rows_TK` the row of each
    routed expert (a device tensor), so nothing waits on the host after the copies are queued."""

    def __call__(self, rows_RB: torch.Tensor, x_TH: torch.Tensor, rows_TK: torch.Tensor,
                 w_TK: torch.Tensor) -> torch.Tensor: ...


class LayerCompute(Protocol):
    """A whole layer in one call on the CPU (e.g. quant.ffn.CpuLayerCompute): `applies(x_TH)`, then
    `(payloads {expert: payload}, num_experts, x_TH, ids_TK, w_TK) -> y_TH` with each token's experts
    summed in moe.dispatch's order, so a store that uses it computes what the in-RAM backend does."""

    def applies(self, x_TH: torch.Tensor) -> bool: ...

    def __call__(self, payloads: Mapping[int, Payload], num_experts: int, x_TH: torch.Tensor,
                 ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor: ...


class DevicePrefill(Protocol):
    """A many-token call of one layer on the device through grouped GEMMs, in waves over the layer's
    device rows (quant.ffn.DeviceRowsPrefill): `applies(x_TH)`, then `begin(x_TH, K)` gives a call with
    `wave(rows_RB, rows_TK, pairs, experts)` (the pairs whose row is below rows_RB.shape[0]),
    `put(tok, k, y)` (an expert computed elsewhere) and `finish(w_TK) -> y_TH`."""

    def applies(self, x_TH: torch.Tensor) -> bool: ...

    def begin(self, x_TH: torch.Tensor, top_k: int): ...


Write = Callable[[int, torch.Tensor], Payload]  # (expert, row to fill) -> the expert's payload over that row


def is_row_payload(payload: object) -> bool:
    buffer = getattr(payload, "buffer", None)
    return (isinstance(buffer, torch.Tensor) and buffer.dtype == torch.uint8 and buffer.dim() == 1
            and callable(getattr(payload, "with_buffer", None)))


# ---------------------------------------------------------------------------------------------- policies


class CachePolicy(Protocol):
    """Chooses which cached expert of one layer to drop. Knows keys only, never payloads."""

    def touch(self, key: Hashable) -> None:
        """Record an access to `key`, member or not (frequency policies keep history)."""

    def insert(self, key: Hashable) -> None:
        """Make `key` a member (it was just copied into a slot)."""

    def evict(self) -> Hashable:
        """Remove and return the member to drop; LookupError if there is none."""

    def __contains__(self, key: Hashable) -> bool: ...

    def __len__(self) -> int: ...


class LRUPolicy:
    """Least recently used: the baseline of mixtral-offloading."""

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()  # oldest first

    def touch(self, key):
        if key in self._order:
            self._order.move_to_end(key)

    def insert(self, key):
        self._order[key] = None
        self._order.move_to_end(key)

    def evict(self):
        if not self._order:
            raise LookupError("no member to evict")
        return self._order.popitem(last=False)[0]

    def __contains__(self, key):
        return key in self._order

    def __len__(self):
        return len(self._order)


class LFUPolicy:
    """Least frequently used with exponential aging; ties go to the least recently used.

    Why frequency: a layer's router has persistent favourites (popularity is skewed and changes slowly
    with the topic), while 8 fresh experts per token flush an LRU cache that holds a few dozen slots.
    Counting every access, members or not, lets a popular expert win its slot back quickly; aging with
    a half-life of `half_life` accesses (default 1024, about 128 decoded tokens at top-8) lets the
    cache follow a change of topic. Aging is O(1): each access adds 2**(tick/half_life), which equals
    halving all older counts every half_life ticks; scores are rescaled before they overflow.
    Trade-off (scripts/bench_cache.py): it beats LRU on skewed independent routing, but loses when
    consecutive tokens reuse each other's experts, since a fresh expert has the lowest score.
    """

    def __init__(self, half_life: float = 1024.0) -> None:
        self.half_life = half_life
        self._tick = 0
        self._score: dict[Hashable, float] = {}
        self._last: dict[Hashable, int] = {}
        self._members: set[Hashable] = set()
        self._offset = 0.0  # exponent already folded into the scores by rescaling

    def touch(self, key):
        self._tick += 1
        exponent = self._tick / self.half_life - self._offset
        if exponent > 500.0:  # keep floats finite: divide every score by 2**exponent
            scale = 2.0**-exponent
            self._score = {k: s * scale for k, s in self._score.items()}
            self._offset += exponent
            exponent = 0.0
        self._score[key] = self._score.get(key, 0.0) + 2.0**exponent
        self._last[key] = self._tick

    def insert(self, key):
        self._members.add(key)
        self._score.setdefault(key, 0.0)
        self._last.setdefault(key, self._tick)

    def evict(self):
        if not self._members:
            raise LookupError("no member to evict")
        victim = min(self._members, key=lambda k: (self._score[k], self._last[k]))
        self._members.remove(victim)
        return victim

    def __contains__(self, key):
        return key in self._members

    def __len__(self):
        return len(self._members)


POLICIES: dict[str, Callable[[], CachePolicy]] = {"lru": LRUPolicy, "lfu": LFUPolicy}


# -------------------------------------------------------------------------------------------- cost model


@dataclass(frozen=True)
class CostModel:
    """Copy an expert to the device, or compute it on the CPU? Compares seconds for this one call.

    copy: latency + bytes / bandwidth; cpu: overhead + tokens * seconds per token (one expert).
    A copy also buys later hits, which this deliberately ignores: the policy decides what stays.
    """

    h2d_bytes_per_s: float = math.inf
    copy_latency_s: float = 0.0
    cpu_s_per_token: float = math.inf
    cpu_overhead_s: float = 0.0

    @classmethod
    def always_copy(cls) -> "CostModel":
        """Free copies: what device=cpu means (moving an expert is a no-op there)."""
        return cls()

    def copy_seconds(self, nbytes: int) -> float:
        return self.copy_latency_s + nbytes / self.h2d_bytes_per_s

    def cpu_seconds(self, n_tokens: int) -> float:
        return self.cpu_overhead_s + n_tokens * self.cpu_s_per_token

    def prefer_cpu(self, nbytes: int, n_tokens: int) -> bool:
        return self.cpu_seconds(n_tokens) < self.copy_seconds(nbytes)


def _best_seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: allocator, kernels, page faults
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def calibrate(
    payload: Payload,
    compute: Compute,
    device: torch.device | str,
    hidden_size: int,
    dtype: torch.dtype = torch.float32,
    tokens: tuple[int, int] = (1, 16),
    repeats: int = 3,
) -> CostModel:
    """Measure host->device bandwidth and CPU expert throughput on this machine, with a real payload.

    On device=cpu copies are free (bandwidth inf), so the store always "copies" (a no-op move).
    """
    device = torch.device(device)
    host = _to_host(payload.to("cpu"), pin=device.type == "cuda")
    bandwidth = math.inf
    if device.type == "cuda":
        row = torch.empty(host.nbytes, dtype=torch.uint8, device=device) if is_row_payload(host) else None

        def copy() -> None:
            if row is not None:  # the store's own copy: into a slot row, no allocation
                row.copy_(host.buffer, non_blocking=True)
            else:
                host.to(device, non_blocking=True)
            torch.cuda.synchronize(device)

        bandwidth = host.nbytes / _best_seconds(copy, repeats)
    t0, t1 = tokens
    x0_TH, x1_TH = (torch.randn(t, hidden_size).to(dtype) for t in (t0, t1))
    s0 = _best_seconds(lambda: compute(host, x0_TH), repeats)
    s1 = _best_seconds(lambda: compute(host, x1_TH), repeats)
    per_token = max((s1 - s0) / (t1 - t0), 1e-12)
    return CostModel(
        h2d_bytes_per_s=bandwidth,
        cpu_s_per_token=per_token,
        cpu_overhead_s=max(s0 - t0 * per_token, 0.0),
    )


# ---------------------------------------------------------------------------------------------- counters


@dataclass(frozen=True)
class Counters:
    """Expert accesses, one per (layer, expert) per call: a prefill call touching an expert with 50
    tokens counts once. hits include resident_hits; misses = copies + cpu_experts."""

    hits: int = 0
    misses: int = 0
    resident_hits: int = 0
    copies: int = 0
    bytes_copied: int = 0
    cpu_experts: int = 0

    def __add__(self, other: "Counters") -> "Counters":
        return Counters(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: "Counters") -> "Counters":
        return Counters(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    def as_dict(self) -> dict:
        """Plain numbers plus hit_rate (hits / accesses; 1.0 when nothing was accessed)."""
        d = asdict(self)
        accesses = self.hits + self.misses
        d["hit_rate"] = self.hits / accesses if accesses else 1.0
        return d


# ------------------------------------------------------------------------------------------- bookkeeping


@dataclass(frozen=True)
class Step:
    """How one expert of one call is served; `victim` is the cached expert a copy replaces."""

    expert: int
    source: Source
    n_tokens: int
    victim: int | None = None


class LayerCache:
    """Placement decisions and counters for one layer. Pure Python: no tensors, no devices."""

    def __init__(
        self,
        nbytes_E: Sequence[int],
        resident: Collection[int] = (),
        slots: int = 0,
        policy: CachePolicy | None = None,
        cost_model: CostModel | None = None,
    ) -> None:
        if slots < 0:
            raise ValueError(f"slots must be >= 0, got {slots}")
        self.nbytes_E = list(nbytes_E)
        self.resident = frozenset(resident)
        self.slots = slots
        self.policy = policy if policy is not None else LRUPolicy()
        self.cost_model = cost_model if cost_model is not None else CostModel.always_copy()
        self._tally = dict.fromkeys((f.name for f in fields(Counters)), 0)  # mutable: plan is a hot loop
        self._one_token_steps: dict[tuple[int, str], Step] = {}  # (expert, source) -> Step(expert, source, 1)

    @property
    def counters(self) -> Counters:
        """This layer's totals since construction."""
        return Counters(**self._tally)

    @property
    def cached(self) -> frozenset[int]:
        """Experts currently in this layer's device slots (never more than `slots`)."""
        return frozenset(e for e in range(len(self.nbytes_E)) if e in self.policy)

    def plan(self, experts: Iterable[tuple[int, int]]) -> list[Step]:
        """Serve order for one call's (expert, n_tokens): on-device experts first, so their compute
        overlaps the copies of the misses; updates the policy and counters as if executed in order."""
        resident, policy = self.resident, self.policy
        on_device, missing = [], []
        for e, n in experts:  # where each expert is before any of them is served
            (on_device if e in resident or e in policy else missing).append((e, n))
        steps = [self._serve_on_device(e, n) for e, n in on_device]
        steps += [self._serve_missing(e, n) for e, n in missing]
        return steps

    def _serve_on_device(self, e: int, n: int) -> Step:
        tally = self._tally
        tally["hits"] += 1
        if e in self.resident:
            tally["resident_hits"] += 1
            return self._step(e, "resident", n)
        self.policy.touch(e)
        return self._step(e, "hit", n)

    def _step(self, e: int, source: Source, n: int) -> Step:
        """Step(e, source, n) without a victim; a decoded token's (n = 1) are made once and reused
        (Steps are frozen), since a layer serves the same few each token."""
        if n != 1:
            return Step(e, source, n)
        step = self._one_token_steps.get((e, source))
        if step is None:
            step = self._one_token_steps[e, source] = Step(e, source, 1)
        return step

    def _serve_missing(self, e: int, n: int) -> Step:
        self.policy.touch(e)
        nbytes = self.nbytes_E[e]
        tally = self._tally
        tally["misses"] += 1
        if self.slots == 0 or self.cost_model.prefer_cpu(nbytes, n):
            tally["cpu_experts"] += 1
            return self._step(e, "cpu", n)
        # The victim may be an expert of this very call (served earlier in the order): the store then
        # copies only after computing it. The policy alone decides; overlap never overrides it.
        victim = self.policy.evict() if len(self.policy) >= self.slots else None
        self.policy.insert(e)
        tally["copies"] += 1
        tally["bytes_copied"] += nbytes
        return Step(e, "copy", n, victim)


# -------------------------------------------------------------------------------------------- data moves


class _RegisteredMemory(mmap.mmap):
    """Anonymous pageable memory that CUDA has page-locked (cudaHostRegister); unregistered when the
    last tensor over it is freed (torch.frombuffer keeps this object alive as long as its storage)."""

    registered = 0  # the registered address, 0 while not registered

    def __del__(self) -> None:
        if self.registered:
            try:
                torch.cuda.cudart().cudaHostUnregister(self.registered)
            except Exception:  # interpreter shutdown: the CUDA runtime may be gone already
                pass
            self.registered = 0


def host_rows(rows: int, nbytes: int, pin: bool) -> torch.Tensor:
    """A [rows, nbytes] uint8 host tensor, zeroed. pin (CUDA only): page-locked in place with
    cudaHostRegister, so exactly rows x nbytes bytes are pinned (PyTorch's pinned allocator would
    round each request up to a power of two: +25% for one 26B-A4B expert, up to 2x for a chunk)."""
    if not pin or rows * nbytes == 0:
        return torch.zeros((rows, nbytes), dtype=torch.uint8)
    memory = _RegisteredMemory(-1, rows * nbytes)  # page-aligned, zero-filled by the kernel
    out = torch.frombuffer(memory, dtype=torch.uint8).view(rows, nbytes)
    err = torch.cuda.cudart().cudaHostRegister(out.data_ptr(), rows * nbytes, 0)
    if int(getattr(err, "value", err)) != 0:
        raise RuntimeError(f"cudaHostRegister of {rows * nbytes} bytes failed with CUDA error {err}")
    memory.registered = out.data_ptr()
    return out


def _to_host(payload: Payload, pin: bool) -> Payload:
    """Host copy; pinned when the device is CUDA so `.to(device, non_blocking=True)` is a real async DMA."""
    if is_row_payload(payload):
        row = host_rows(1, payload.nbytes, pin)[0]
        row.copy_(payload.buffer)
        return payload.with_buffer(row)
    host = payload.to("cpu")
    pin_memory = getattr(host, "pin_memory", None)
    return pin_memory() if pin and pin_memory is not None else host


def _tensors(payload: Payload) -> list[torch.Tensor]:
    """The tensors a payload holds (a PackedExpert's buffer, or a dataclass's tensor fields)."""
    buffer = getattr(payload, "buffer", None)
    if isinstance(buffer, torch.Tensor):
        return [buffer]
    return [v for v in vars(payload).values() if isinstance(v, torch.Tensor)] if hasattr(payload, "__dict__") else []


class _Copier:
    """Host->device copies. On CUDA they run on a side stream so they overlap compute (the only CUDA code)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def start(self, host: Payload) -> tuple[Payload, object]:
        """Generic payloads: a new device copy."""
        if self.stream is None:
            return host.to(self.device), None
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            payload = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return payload, done

    def fill(self, row: torch.Tensor, host_row: torch.Tensor, after: object = None) -> object:
        """Copy a host row into a device slot row in place (no allocation); the event to wait on.

        `after`: the event recorded after the last kernel that read the row's buffer (`read_done`), all
        the copy must wait for, so it overlaps whatever the compute stream runs after that kernel (the
        next layers' attention, the dense MLP); None: nothing has read it yet."""
        if self.stream is None:
            row.copy_(host_row)
            return None
        if after is not None:
            self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            row.copy_(host_row, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        return done

    def ready(self, *done: object) -> None:
        """The compute stream waits for these copies (their events; None: nothing to wait for)."""
        if self.stream is None:
            return
        stream = torch.cuda.current_stream(self.device)  # looked up once for all of a call's copies
        for event in done:
            if event is not None:
                stream.wait_event(event)

    def read_done(self) -> object:
        """An event after every kernel queued on the compute stream so far (None off CUDA)."""
        if self.stream is None:
            return None
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(self.device))
        return done


class _RowsToDevice:
    """A decoded token's device rows ([1, K] int32, from host ints) for the layer's one expert kernel.

    On CUDA a non-blocking copy from a pinned row per layer: a copy from pageable memory (or writing a
    device tensor's element from Python) first waits for the stream to drain, a host sync. The pinned
    row is rewritten only once its last copy is done (an event; free in practice: the layer's next
    token comes after that token's routing sync, which waits for work queued after the copy)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._staged: dict[int, tuple] = {}  # layer -> (pinned [1, K], device [1, K], event after its copy)

    def __call__(self, layer: int, rows: list[int]) -> torch.Tensor:
        if self.device.type != "cuda":
            return torch.tensor([rows], dtype=torch.int32, device=self.device)
        staged = self._staged.get(layer)
        if staged is None or staged[0].shape[1] != len(rows):
            staged = self._staged[layer] = (torch.empty((1, len(rows)), dtype=torch.int32, pin_memory=True),
                                            torch.empty((1, len(rows)), dtype=torch.int32, device=self.device),
                                            torch.cuda.Event())
        host, dev, copied = staged
        copied.synchronize()  # the last copy from this row has read it (done long ago: a routing sync came since)
        host.numpy()[0] = rows
        dev.copy_(host, non_blocking=True)
        copied.record(torch.cuda.current_stream(self.device))
        return dev


class ExpertStore:
    """All routed experts of one model, placed across the device and host RAM.

    experts: {layer: [payload per expert]} (any device; the store makes its own device/host copies).
    resident: {layer: expert ids kept on the device}; slots: cache slots per layer (int or {layer: int}).
    policy: factory of one `CachePolicy` per layer. cost_model: decides copy vs CPU on a miss
    (default: always copy, right for device=cpu; on CUDA pass `calibrate(...)`).
    """

    def __init__(
        self,
        experts: Mapping[int, Sequence[Payload]] | None,
        compute: Compute,
        device: torch.device | str = "cpu",
        resident: Mapping[int, Collection[int]] | None = None,
        slots: int | Mapping[int, int] = 0,
        policy: Callable[[], CachePolicy] = LRUPolicy,
        cost_model: CostModel | None = None,
        compute_layer: "LayerCompute | None" = None,
        device_compute: "DeviceRowsCompute | None" = None,
        device_prefill: "DevicePrefill | None" = None,
    ) -> None:
        self.device = torch.device(device)
        self.compute = compute
        self.compute_layer = compute_layer if self.device.type == "cpu" else None
        self.device_compute = device_compute  # a decoded token's layer in one call when all its experts are on the device
        self.device_prefill = device_prefill  # a prompt's layer through grouped GEMMs over the device rows, in waves
        self._where: dict[int, dict[int, Payload]] = {}  # layer -> every expert where it lies (compute_layer)
        self.host = torch.device("cpu")
        self._copier = _Copier(self.device)
        self._routing = RoutingToHost(self.device)
        self._slot_counts, self._policy, self._cost_model = slots, policy, cost_model
        self._layers: dict[int, LayerCache] = {}
        self._resident: dict[int, dict[int, Payload]] = {}
        self._host: dict[int, dict[int, Payload]] = {}
        self._slots: dict[int, dict[int, tuple[Payload, object]]] = {}  # expert -> (device payload, copy done)
        self._slot_rows: dict[int, list[Payload]] = {}  # row payloads: one view per slot row
        self._free_rows: dict[int, list[int]] = {}
        self._row_of: dict[int, dict[int, int]] = {}  # expert -> slot row it occupies
        self._device_rows: dict[int, torch.Tensor] = {}  # layer -> [resident + slots, nbytes]: resident rows, then slot rows
        self._row_map: dict[int, list[int]] = {}  # layer -> [E] host ints: expert -> its device row
        self._rows_to_device = _RowsToDevice(self.device)
        self._read_done: dict[int, object] = {}  # layer -> event after the last kernel that read its device rows
        self._host_buffers: list[torch.Tensor] = []  # per layer: host rows
        self._pending: dict[int, tuple] = {}  # layer -> (ids_TK, kind, state) from prefetch
        for layer, payloads in (experts or {}).items():
            self.add_layer(layer, payloads, (resident or {}).get(layer, ()))

    def _n_slots(self, layer: int) -> int:
        slots = self._slot_counts
        return slots if isinstance(slots, int) else slots.get(layer, 0)

    def _check(self, layer: int, keep: frozenset, n: int) -> None:
        if not keep <= set(range(n)):
            raise ValueError(f"layer {layer}: resident ids {sorted(keep)} outside 0..{n - 1}")

    def add_layer(self, layer: int, payloads: Sequence[Payload], resident: Collection[int] = ()) -> None:
        """Place one layer's experts: `resident` ids on the device, the rest in host RAM (pinned on CUDA).

        Layers can be added one at a time as they are loaded, so only one layer's payloads are
        ever held in both places. Row payloads are copied into the layer's buffers (`build_layer`).
        """
        payloads = list(payloads)
        if payloads and all(is_row_payload(p) for p in payloads) and len({p.nbytes for p in payloads}) == 1:
            def copy(e: int, row: torch.Tensor) -> Payload:
                row.copy_(payloads[e].buffer)
                return payloads[e].with_buffer(row)

            self.build_layer(layer, len(payloads), payloads[0].nbytes, resident, copy)
            return
        keep = frozenset(resident)
        self._check(layer, keep, len(payloads))
        self._where.pop(layer, None)
        self._layers[layer] = LayerCache([p.nbytes for p in payloads], keep, self._n_slots(layer), self._policy(),
                                         self._cost_model)
        self._resident[layer] = {e: payloads[e].to(self.device) for e in sorted(keep)}
        pin = self.device.type == "cuda"
        self._host[layer] = {e: _to_host(p, pin) for e, p in enumerate(payloads) if e not in keep}
        self._slots[layer] = {}

    def build_layer(self, layer: int, num_experts: int, nbytes: int, resident: Collection[int], write: Write) -> None:
        """Allocate one layer's buffers and fill them: `write(e, row)` puts expert e's bytes into `row`
        (a row of the device buffer when e is resident, of the host buffer otherwise) and returns its
        payload over that row. Also allocates the layer's slot rows, after the resident rows in the same
        device tensor, so one kernel can read every expert on the device (`device_compute`), and the map
        from an expert to its row there (`_row_map`, kept by `_copy`)."""
        keep = frozenset(resident)
        self._check(layer, keep, num_experts)
        self._where.pop(layer, None)
        on_device = sorted(keep)
        on_host = [e for e in range(num_experts) if e not in keep]
        n_slots = self._n_slots(layer) if on_host else 0
        self._layers[layer] = LayerCache([nbytes] * num_experts, keep, n_slots, self._policy(), self._cost_model)
        rows_dev = torch.empty((len(on_device) + n_slots, nbytes), dtype=torch.uint8, device=self.device)
        dev, slots = rows_dev[: len(on_device)], rows_dev[len(on_device) :]
        host = host_rows(len(on_host), nbytes, pin=self.device.type == "cuda")
        rows = {e: (self._resident, dev[i]) for i, e in enumerate(on_device)}
        rows.update({e: (self._host, host[i]) for i, e in enumerate(on_host)})
        self._resident[layer], self._host[layer] = {}, {}
        for e in range(num_experts):  # in id order: the loader reads the checkpoint in chunks of ids
            tier, row = rows[e]
            tier[layer][e] = write(e, row)
        self._resident[layer] = dict(sorted(self._resident[layer].items()))
        slots.zero_()
        like = next(iter(self._host[layer].values()), None)
        self._slot_rows[layer] = [like.with_buffer(slots[i]) for i in range(n_slots)]
        self._free_rows[layer] = list(range(n_slots - 1, -1, -1))
        self._row_of[layer] = {}
        self._slots[layer] = {}
        self._device_rows[layer] = rows_dev
        row_map = [0] * num_experts  # experts not on the device: filled by _copy
        for row, e in enumerate(on_device):
            row_map[e] = row
        self._row_map[layer] = row_map
        self._host_buffers += [host] if host.numel() else []

    def __call__(self, layer: int) -> "LayerExperts":
        """The expert backend of `layer`: `(x_TH, ids_TK, w_TK) -> y_TH`."""
        return LayerExperts(self, layer)

    experts_for_layer = __call__

    def layer(self, layer: int) -> LayerCache:
        """Bookkeeping of one layer (resident set, cached set, slots, counters)."""
        return self._layers[layer]

    def resident_payloads(self, layer: int) -> Mapping[int, Payload]:
        """Read-only view {expert: payload} of `layer`'s experts kept on the device."""
        return MappingProxyType(self._resident[layer])

    def host_payloads(self, layer: int) -> Mapping[int, Payload]:
        """Read-only view {expert: payload} of `layer`'s experts held in host RAM."""
        return MappingProxyType(self._host[layer])

    def device_tensors(self) -> list[torch.Tensor]:
        """Every tensor the store holds on the device: resident experts and cache slots (filled or not)."""
        out = [rows for rows in self._device_rows.values() if rows.numel()]
        generic = [layer for layer in self._resident if layer not in self._slot_rows]
        out += [t for layer in generic for p in self._resident[layer].values() for t in _tensors(p)]
        return out + [t for layer in generic for p, _ in self._slots[layer].values() for t in _tensors(p)]

    def host_tensors(self) -> list[torch.Tensor]:
        """Every tensor of the host-RAM tier."""
        generic = [layer for layer in self._host if layer not in self._slot_rows]
        return list(self._host_buffers) + [t for layer in generic for p in self._host[layer].values()
                                           for t in _tensors(p)]

    def device_experts(self, layer: int) -> frozenset[int]:
        """Experts of `layer` whose payload is in a device cache slot right now."""
        return frozenset(self._slots[layer])

    def snapshot(self) -> Counters:
        """Totals so far; `stats(since=snapshot)` gives what happened after it (e.g. one token)."""
        total = Counters()
        for cache in self._layers.values():
            total = total + cache.counters
        return total

    def stats(self, since: Counters | None = None) -> dict:
        """Plain dict: hits, misses, resident_hits, copies, bytes_copied, cpu_experts, hit_rate."""
        now = self.snapshot()
        return (now - since if since is not None else now).as_dict()

    def prefetch(self, layer: int, ids_TK: torch.Tensor, w_TK: torch.Tensor | None = None) -> None:
        """Called right after the router, before the caller's other work (the decoder: the dense MLP).

        One token (with w_TK): start copying its ids and weights to the host, the layer's one host
        sync, which `run` waits for; the GPU meanwhile runs what was queued after the router. Many
        tokens: decide the placement and start the copies now. `run` with the same ids_TK picks it up."""
        if ids_TK.shape[0] == 1 and w_TK is not None:
            self._pending[layer] = (ids_TK, "routing", self._routing.start(ids_TK, w_TK))
        else:
            self._pending[layer] = (ids_TK, "plan", self._begin(layer, ids_TK))

    def run(self, layer: int, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """sum_k w[t,k] * expert_{ids[t,k]}(x[t]) for one layer, moving experts as the cache decides."""
        pending = self._pending.pop(layer, None)
        if pending is not None and pending[0] is not ids_TK:
            pending = None
        if self.compute_layer is not None and self.compute_layer.applies(x_TH):
            return self._run_layer(layer, pending, x_TH, ids_TK, w_TK)
        if ids_TK.shape[0] == 1:
            kind = pending[1] if pending is not None else None
            ids, weights = self._routing.wait(pending[2] if kind == "routing" else self._routing.start(ids_TK, w_TK))
            steps, deferred = pending[2][1:] if kind == "plan" else self._begin_one(layer, ids[0])
            if self._on_device_rows(layer, steps, deferred):
                return self._run_on_device(layer, steps, x_TH, ids[0], w_TK)
            y_of = {}
            for step in steps:
                if step in deferred:
                    self._copy(layer, step)
                y_of[step.expert] = self._compute(layer, step, x_TH)
            return dispatch(x_TH, ids_TK, w_TK, lambda e, _x: y_of.pop(e), host=(ids[0], weights[0]))
        if pending is not None and pending[1] == "plan":
            groups, steps, deferred = pending[2]
        else:
            groups, steps, deferred = self._begin(layer, ids_TK)
        if self.device_prefill is not None and layer in self._device_rows and self.device_prefill.applies(x_TH):
            return self._run_waves(layer, groups, steps, deferred, x_TH, ids_TK, w_TK)
        tok_of = {e: tok for e, tok, _ in groups}
        y_of = {}
        for step in steps:
            if step in deferred:
                self._copy(layer, step)
            y_of[step.expert] = self._compute(layer, step, x_TH[tok_of[step.expert]])
        # Accumulate in dispatch's own (expert-sorted) order so every placement sums identically.
        return dispatch(x_TH, ids_TK, w_TK, lambda e, _x: y_of.pop(e), groups=groups)

    def _on_device_rows(self, layer: int, steps: list[Step], deferred: set[Step]) -> bool:
        """Whether `_run_on_device` serves this call: a device compute is set, the layer lives in row
        buffers, and after the copies every expert of the call is on the device together (none computed
        on the CPU, no copy waiting to overwrite an expert of this very call)."""
        return (self.device_compute is not None and layer in self._device_rows and not deferred
                and all(step.source != "cpu" for step in steps))

    def _run_on_device(self, layer: int, steps: list[Step], x_TH: torch.Tensor, ids: list[int],
                       w_TK: torch.Tensor) -> torch.Tensor:
        """Every expert of a decoded token (routed to `ids`, host ints) read in place from the layer's
        device rows by one kernel, once the copies it needs have landed; the rows come from the host's
        map in one non-blocking copy."""
        slots = self._slots[layer]
        self._copier.ready(*(slots[step.expert][1] for step in steps if step.source != "resident"))
        row_map = self._row_map[layer]
        rows_TK = self._rows_to_device(layer, [row_map[e] for e in ids])
        y_TH = self.device_compute(self._device_rows[layer], x_TH, rows_TK, w_TK)
        self._read_done[layer] = self._copier.read_done()
        return y_TH

    def _run_waves(self, layer: int, groups, steps: list[Step], deferred: set[Step], x_TH: torch.Tensor,
                   ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        """A prompt's layer through `device_prefill`, reading experts in place from the layer's device rows:
        first the experts already there (resident, cached) while the first misses copy, then the copied
        ones in the plan's order in waves (`waves`). A copy that replaces an expert of this call is queued
        once the wave that reads that expert is, and waits for it on the device (`_Copier.fill`): with
        waves of half the slots and LRU's order (a miss replaces the one a slot count before it), one
        wave's copies land while the wave before computes. Experts the cost model leaves in host RAM are
        computed there, as the per-expert path does. The plan, and so the counters and the policy's
        accesses, are the per-expert path's."""
        call = self.device_prefill.begin(x_TH, ids_TK.shape[1])
        rows_RB, row_map = self._device_rows[layer], self._row_map[layer]
        pairs_of = {e: (tok, k) for e, tok, k in groups}
        plan = waves(steps, max(1, self._layers[layer].slots // 2))
        wave_of = {step.expert: j for j, wave in enumerate(plan) for step in wave}
        queued = [step for step in steps if step in deferred][::-1]  # plan order, next at the end
        for j, wave in enumerate(plan):
            while queued and wave_of[queued[-1].victim] < j:  # the expert it replaces is read by a queued wave
                self._copy(layer, queued.pop())
            rows_E = [rows_RB.shape[0]] * len(row_map)  # past the last row: a pair of another wave
            for step in wave:
                rows_E[step.expert] = row_map[step.expert]
                if step.source != "resident":
                    self._copier.ready(self._slots[layer][step.expert][1])
            rows_TK = self._rows_table(rows_E)[ids_TK]
            call.wave(rows_RB, rows_TK, sum(step.n_tokens for step in wave), len(wave))
            self._read_done[layer] = self._copier.read_done()
        for step in steps:
            if step.source == "cpu":
                tok, k = pairs_of[step.expert]
                call.put(tok, k, self._compute(layer, step, x_TH[tok]))
        return call.finish(w_TK)

    def _rows_table(self, rows_E: list[int]) -> torch.Tensor:
        """int32 [E] on the device, from host ints, without a host sync (a pinned copy on CUDA, whose
        block torch's pinned allocator keeps until the copy is done)."""
        table = torch.tensor(rows_E, dtype=torch.int32)
        if self.device.type != "cuda":
            return table.to(self.device)
        return table.pin_memory().to(self.device, non_blocking=True)

    def _run_layer(self, layer: int, pending, x_TH: torch.Tensor, ids_TK: torch.Tensor,
                   w_TK: torch.Tensor) -> torch.Tensor:
        """The CPU's one call per layer: the cache decides and copies as usual (counters, slots), then
        `compute_layer` reads every expert where it lies (a resident row, or its host row: on the CPU
        both are RAM and a slot holds the host row's very bytes), in one kernel call."""
        if ids_TK.shape[0] == 1:
            kind = pending[1] if pending is not None else None
            if kind == "plan":
                steps, deferred = pending[2][1:]
            else:
                ids, _ = self._routing.wait(pending[2] if kind == "routing" else self._routing.start(ids_TK, w_TK))
                steps, deferred = self._begin_one(layer, ids[0])
        elif pending is not None and pending[1] == "plan":
            _, steps, deferred = pending[2]
        else:
            _, steps, deferred = self._begin(layer, ids_TK)
        for step in steps:  # nothing reads the slots here, so a deferred copy need not wait
            if step in deferred:
                self._copy(layer, step)
        where = self._where.get(layer)
        if where is None:
            where = self._where[layer] = {**self._resident[layer], **self._host[layer]}
        return self.compute_layer(where, len(self._layers[layer].nbytes_E), x_TH, ids_TK, w_TK)

    def _begin_one(self, layer: int, ids: list[int]):
        """(steps, deferred copies) of one decoded token routed to `ids` (host ints)."""
        steps = self._layers[layer].plan([(e, 1) for e in sorted(ids)])
        return steps, self._start_copies(layer, steps)

    def _begin(self, layer: int, ids_TK: torch.Tensor):
        """(groups, steps, deferred copies) of one call: tokens grouped by expert, the cache's plan, and
        every copy that can start now already started."""
        groups = group_by_expert(ids_TK)
        steps = self._layers[layer].plan((e, len(tok)) for e, tok, _ in groups)
        return groups, steps, self._start_copies(layer, steps)

    def _start_copies(self, layer: int, steps: list[Step]) -> set[Step]:
        """Start every copy whose slot is free or held by an expert outside this call; return the rest,
        which must wait until the expert they replace has been computed."""
        copies = [step for step in steps if step.source == "copy"]
        if not copies:  # every expert of the call is resident or cached
            return set()
        called = {s.expert for s in steps}
        deferred = set()
        for step in copies:
            if step.victim is not None and step.victim in called:
                deferred.add(step)
            else:
                self._copy(layer, step)
        return deferred

    def _copy(self, layer: int, step: Step) -> None:
        slots = self._slots[layer]
        if step.victim is not None:
            del slots[step.victim]
        host = self._host[layer][step.expert]
        if layer in self._slot_rows:  # row payloads: refill a slot row in place
            rows = self._row_of[layer]
            row = rows.pop(step.victim) if step.victim is not None else self._free_rows[layer].pop()
            rows[step.expert] = row
            self._row_map[layer][step.expert] = len(self._resident[layer]) + row  # slot rows follow the resident ones
            payload = self._slot_rows[layer][row]
            slots[step.expert] = payload, self._copier.fill(payload.buffer, host.buffer, self._read_done.get(layer))
        else:
            slots[step.expert] = self._copier.start(host)
        assert len(slots) <= self._layers[layer].slots, "cache slot bound exceeded"

    def _compute(self, layer: int, step: Step, x_TH: torch.Tensor) -> torch.Tensor:
        if step.source == "resident":
            return self.compute(self._resident[layer][step.expert], x_TH)
        if step.source == "cpu":  # in fp32, what the CPU's kernels compute in (bf16 there: bitsandbytes' slow path)
            y_TH = self.compute(self._host[layer][step.expert], x_TH.to(self.host, torch.float32))
            return y_TH.to(x_TH.device, x_TH.dtype)
        payload, done = self._slots[layer][step.expert]
        self._copier.ready(done)
        y_TH = self.compute(payload, x_TH)
        self._read_done[layer] = self._copier.read_done()  # a later copy into this slot row waits for it
        return y_TH


def waves(steps: list[Step], size: int) -> list[list[Step]]:
    """A many-token call's plan as waves of experts that are on the device together: those already
    there (resident, cached hits), then the copied ones in plan order, at most `size` a wave, a new
    wave wherever a copy's victim is in the current one (so no wave outgrows the slots). Experts
    computed on the CPU are in none."""
    on_device = [step for step in steps if step.source in ("resident", "hit")]
    out, wave = [on_device] if on_device else [], []
    for step in steps:
        if step.source != "copy":
            continue
        if wave and (len(wave) == size or any(s.expert == step.victim for s in wave)):
            out.append(wave)
            wave = []
        wave.append(step)
    return out + [wave] if wave else out


class LayerExperts:
    """Expert backend bound to one layer of a store: what the decoder's MoE block calls."""

    def __init__(self, store: ExpertStore, layer: int) -> None:
        self.store = store
        self.layer = layer

    def __call__(self, x_TH: torch.Tensor, ids_TK: torch.Tensor, w_TK: torch.Tensor) -> torch.Tensor:
        return self.store.run(self.layer, x_TH, ids_TK, w_TK)

    def prefetch(self, ids_TK: torch.Tensor, w_TK: torch.Tensor | None = None) -> None:
        self.store.prefetch(self.layer, ids_TK, w_TK)
