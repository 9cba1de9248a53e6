"""Multi-tensor launch tables shared by the Triton kernels.

One launch covers a whole list of tensors. Tensors are grouped by dtype (a kernel's element
type is a constexpr, so at most three launches per list), and each group gets:
- a row table, int64 [tensors, columns]: raw data addresses, element counts and whatever the
  op needs per tensor; the kernel casts an address to a typed pointer;
- a chunk table: program i works on `CHUNK` elements of tensor `chunk_rows[i]`, starting at
  `chunk_starts[i]`, so big tensors spread over many programs and small ones cost one.
All tables of a call travel in ONE host-to-device copy from pinned memory (`upload`), without
synchronising with the device. Elements are visited in memory order: each tensor must be
dense in memory (`dense_in_memory`); callers stage other tensors through a dense copy.

Building tables costs host time per tensor, so an op keeps them in a `Cache` and builds them
again only when the tensors they describe change (`dsd_kernels.host.describe_tensors`), or
when the call is on another CUDA stream (`current_stream`).
Addresses that change with every call
(gradients, freshly allocated outputs) live in their own small tables (`address_tables`),
and the scalars of a call (learning rate, bias corrections) are kernel arguments.
"""

import contextlib
from typing import NamedTuple

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

# 16-byte aligned base addresses let the compiler use 128-bit loads; the allocator gives
# 512-byte aligned storage, so only views at odd offsets miss it.
VECTOR_ALIGNMENT = 16


class Group(NamedTuple):
    """The tensors of one dtype in a launch list, with their tables on the device."""
    dtype: tl.dtype  # the kernel's element type
    indices: list[int]  # positions of the group's tensors in the caller's list
    rows: torch.Tensor  # int64 [tensors, columns]
    full_chunks: tuple[torch.Tensor, torch.Tensor]  # chunks of CHUNK elements: rows, starts
    tail_chunks: tuple[torch.Tensor, torch.Tensor]  # each tensor's last, shorter chunk
    aligned: bool  # every address of the group is 16-byte aligned

    def launches(self):
        """(FULL, chunk rows, chunk starts) of the one or two launches the group needs: full
        chunks are launched apart so that their kernel needs no bounds check."""
        for full, (rows, starts) in ((True, self.full_chunks), (False, self.tail_chunks)):
            if rows.numel():
                yield full, rows, starts


@triton.jit
def column_pointer(row, column, TYPE: tl.constexpr, ALIGNED: tl.constexpr,
                   BYTES: tl.constexpr = VECTOR_ALIGNMENT):
    """The address in a row table's column as a TYPE pointer; with ALIGNED, promised to be a
    multiple of BYTES (the hint must sit on the pointer itself, not on the integer address)."""
    pointer = tl.load(row + column).to(tl.pointer_type(TYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, BYTES)
    return pointer


@triton.jit
def lanes(index, remaining, FULL: tl.constexpr, BLOCK: tl.constexpr):
    """Which lanes of a block hold elements. In a full chunk the answer is a constant the
    compiler sees, so loads and stores become 128-bit; in a tail chunk it depends on the size."""
    if FULL:
        return tl.full([BLOCK], 1, tl.int1)
    return index < remaining


@triton.jit
def blocks_end(remaining, FULL: tl.constexpr, CHUNK: tl.constexpr):
    """Where a chunk's loop over its blocks stops: at CHUNK in a full chunk (a trip count the
    compiler sees); in a tail chunk at the tensor's end, so that no program runs blocks that
    hold none of its elements (a small tensor's chunk is mostly past its end)."""
    return CHUNK if FULL else tl.minimum(remaining, CHUNK)


def dtype_groups(tensors) -> dict[torch.dtype, list[int]]:
    """The positions of the tensors of each dtype, in the order of `grouped`'s groups."""
    by_dtype: dict[torch.dtype, list[int]] = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    return by_dtype


def grouped(device, tensors, row_of, addresses: int, chunk: int, *extra: torch.Tensor):
    """Group `tensors` by dtype and build each group's tables; `row_of(i)` is tensor i's row
    (a list of ints, beginning with `addresses` data addresses). The groups' tables and the
    `extra` host tables reach the device in one copy. Returns (groups, extra device tables)."""
    by_dtype = dtype_groups(tensors)
    host, aligned = list(extra), []
    for indices in by_dtype.values():
        rows = torch.tensor([row_of(i) for i in indices], dtype=torch.int64)
        host += [rows, *chunk_table([tensors[i].numel() for i in indices], chunk)]
        aligned.append(bool((rows[:, :addresses] % VECTOR_ALIGNMENT == 0).all()))
    on_device = upload(device, *host)
    tables, groups = on_device[len(extra):], []
    for g, (dtype, indices) in enumerate(by_dtype.items()):
        rows, full_rows, full_starts, tail_rows, tail_starts = tables[5 * g:5 * g + 5]
        groups.append(Group(TL_DTYPES[dtype], indices, rows, (full_rows, full_starts),
                            (tail_rows, tail_starts), aligned[g]))
    return groups, on_device[:len(extra)]


def cached_groups(cache, device, tensors, chunk: int, *columns, key=()) -> list[Group]:
    """The groups of `grouped` for rows [data address, numel, *column values] (one address),
    kept in `cache` under the tensors' addresses, sizes and dtypes, the columns, the stream
    and `key` (whatever else the kernel's tables depend on): repeated calls on the same
    tensors build nothing."""
    full_key = (device, current_stream(device), tuple(map(torch.Tensor.data_ptr, tensors)),
                tuple(x.numel() for x in tensors), tuple(x.dtype for x in tensors),
                *map(tuple, columns), *key)
    groups = cache.get(full_key)
    if groups is None:
        groups, _ = grouped(
            device, tensors,
            lambda i: [tensors[i].data_ptr(), tensors[i].numel(), *(c[i] for c in columns)],
            1, chunk)
        cache.add(full_key, groups)
    return groups


def address_tables(device, groups: list[Group], addresses: tuple[int, ...],
                   *extra: torch.Tensor):
    """Per group, an int64 table of one data address per row (`addresses[i]` for tensor i),
    for tensors that move while the groups' other tables stay; sent with the `extra` host
    tables in one copy. Returns (the groups' tables, whether each group's addresses are
    aligned, the extra device tables)."""
    host = [torch.tensor([addresses[i] for i in group.indices], dtype=torch.int64)
            for group in groups]
    aligned = [all(addresses[i] % VECTOR_ALIGNMENT == 0 for i in group.indices)
               for group in groups]
    on_device = upload(device, *host, *extra)
    return on_device[:len(groups)], aligned, on_device[len(groups):]


def current_stream(device: torch.device):
    """The stream a call's copies and launches go to: part of every cache key, so that tables
    are only read on the stream that uploaded them (docs/design.md, "Triton launch tables")."""
    return torch.cuda.current_stream(device) if device.type == "cuda" else None


class Cache(dict):
    """An op's tables of its recent calls, each under the key of everything it was built from.

    A key holds every input of the build (device, stream, addresses, element counts, dtypes; a
    key taken before staging also the sizes and strides that decide a copy), so a table found
    under a call's key is exactly the table the call would build: none can be stale. Tables
    hold addresses, never the tensors: a tensor freed and another of the same geometry
    allocated at its address reuse the same, still correct, table. The oldest entry goes
    first (moving a hit to the end would hash and compare its key twice per call).
    """

    SIZE = 16  # a training loop's param groups x devices x dtype mixes, with room to spare

    def __init__(self):
        super().__init__()
        self.builds = 0  # misses: tables built since the cache was made

    def add(self, key, built, reusable: bool = True):
        """Count a build and keep its tables; not when they are not `reusable`: built from
        staging copies of the tensors the key describes. Returns them."""
        self.builds += 1
        if reusable:
            self[key] = built
            if len(self) > self.SIZE:
                del self[next(iter(self))]
        return built


def chunk_table(numels: list[int], chunk: int) -> list[torch.Tensor]:
    """Row index (int32) and first element (int64) of every CHUNK-sized piece of every
    tensor: for the full pieces, then for the shorter last pieces."""
    sizes = torch.tensor(numels, dtype=torch.int64)
    counts = (sizes + chunk - 1) // chunk
    rows = torch.repeat_interleave(counts)  # i, once per chunk of tensor i (int64: fast path)
    first_chunk = torch.cumsum(counts, 0) - counts
    starts = (torch.arange(rows.numel()) - first_chunk[rows]) * chunk
    full = starts + chunk <= sizes[rows]
    rows = rows.to(torch.int32)
    return [rows[full], starts[full], rows[~full], starts[~full]]


def upload(device: torch.device, *tables: torch.Tensor) -> list[torch.Tensor]:
    """Host tables as device tensors, moved in one non-blocking copy from pinned memory."""
    if device.type != "cuda":
        return [t.contiguous() for t in tables]
    pieces, spans, offset = [], [], 0
    for t in tables:
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        pad = -raw.numel() % 8  # keep every table 8-byte aligned for its typed view
        pieces += [raw, torch.zeros(pad, dtype=torch.uint8)]
        spans.append((offset, raw.numel()))
        offset += raw.numel() + pad
    staged = torch.cat(pieces).pin_memory().to(device, non_blocking=True)
    return [staged[start:start + size].view(t.dtype).view(t.shape)
            for t, (start, size) in zip(tables, spans)]


def on_device(device: torch.device):
    """Launch on the tensors' GPU (Triton launches on the current device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dense_in_memory(t: torch.Tensor) -> bool:
    """Every element at its own address, with no gaps: a permutation of a contiguous layout."""
    if t.is_contiguous() or t.numel() == 0:  # the common case, without a Python loop
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


class Staging:
    """Tensors laid out like a dense reference, so one memory-order pass serves them all.

    A tensor whose strides differ from the reference is copied into the reference's layout;
    `finish()` copies the staged tensors that the kernel wrote back to the caller's tensors.
    Every copy lives until then, whoever asked for it: a launch reads it by address only.
    `staged` says whether any copy was made.
    """

    def __init__(self):
        self._write_back: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._copies: list[torch.Tensor] = []
        self.staged = False

    def dense(self, t: torch.Tensor, written: bool) -> torch.Tensor:
        if dense_in_memory(t):
            return t
        return self._copy(t, t.contiguous(), written)

    def like(self, t: torch.Tensor, ref: torch.Tensor, written: bool) -> torch.Tensor:
        """`t` in the layout of `ref` (which is dense in memory)."""
        if t.stride() == ref.stride():
            return t
        return self._copy(t, torch.empty_like(ref, dtype=t.dtype).copy_(t), written)

    def _copy(self, t: torch.Tensor, staged: torch.Tensor, written: bool) -> torch.Tensor:
        self.staged = True
        self._copies.append(staged)
        if written:
            self._write_back.append((t, staged))
        return staged

    def finish(self) -> None:
        for original, staged in self._write_back:
            original.copy_(staged)
        self._copies.clear()
