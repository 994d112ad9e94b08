"""An adapter's safetensors file -> the packed rows its pool pages hold.

A packed adapter is ``[layers, used]``: for each layer, the A rows and B^T rows of its target
modules in the order of its ``AdapterPlan`` rows. Adapters are read on helper threads while the
engine thread runs steps, and the two share the GIL. Reading tensor by tensor (``get_tensor``,
then stacking and slicing, a few hundred Python calls per adapter of a 7B model) slowed a thread
of small torch ops 5x on CPU while two readers ran (``benchmarks/bench_adapter_reads.py``). So a
file is read with one call into one buffer (the read releases the GIL) and packed with one
gather, whose index is computed once per file layout: the adapters of one rank and writer have
byte-identical headers, and the header is the cache key.
"""

from __future__ import annotations

import json
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..layout import AdapterPlan, PlannedRow

# base_model.model.model.layers.<i>.<self_attn|mlp>.<module>.lora_<A|B>[.<adapter>].weight
LORA_KEY = re.compile(
    r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(?:self_attn|mlp)\."
    r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)\.lora_([AB])(?:\.[\w-]+)?\.weight$"
)
DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class AdapterFileReader:
    """Reads packed adapters for one ``PoolLayout``; keeps the gather index of the last few file
    layouts. Within one pool layout the header determines the plan (its shapes give the ranks,
    the ranks the plan), so the header's bytes are the whole cache key."""

    def __init__(self, num_layers: int, max_layouts: int = 4) -> None:
        self.num_layers = num_layers
        self.max_layouts = max_layouts
        self._layouts: OrderedDict[bytes, _Layout] = OrderedDict()
        self._lock = threading.Lock()

    def read(self, path: Path, plan: AdapterPlan, dtype: torch.dtype) -> torch.Tensor:
        """``[layers, plan.used_elements]`` in ``dtype``. Raises ValueError/OSError on a damaged file."""
        buf = _read_file(path)
        if buf.numel() < 8:
            raise ValueError("file is shorter than its header length")
        (n,) = struct.unpack("<Q", buf[:8].numpy().tobytes())
        key = header = buf[8:8 + n].numpy().tobytes()
        with self._lock:
            layout = self._layouts.get(key)
            if layout is not None:
                self._layouts.move_to_end(key)
        if layout is None:
            layout = _Layout.build(json.loads(header), plan, self.num_layers)
            with self._lock:
                self._layouts[key] = layout
                while len(self._layouts) > self.max_layouts:
                    self._layouts.popitem(last=False)
        data = buf[8 + n:]
        if data.numel() < layout.data_bytes:
            raise ValueError(f"{path.name} holds {data.numel()} bytes of tensor data, its header "
                             f"describes {layout.data_bytes}")
        elements = layout.elements(data)
        return elements.index_select(0, layout.index).view(self.num_layers, -1).to(dtype)


class _Layout:
    """Where every packed element lies among a file's tensor elements."""

    def __init__(self, index: torch.Tensor, tensors: list[tuple[int, int, torch.dtype]],
                 dtype: torch.dtype | None) -> None:
        self.index = index
        self.tensors = tensors  # (byte start, byte end, dtype) in file order
        self.dtype = dtype  # one dtype for the whole file, or None (mixed: converted to fp32)
        self.data_bytes = max((e for _, e, _ in tensors), default=0)

    def elements(self, data: torch.Tensor) -> torch.Tensor:
        """The file's tensor data as one flat tensor of elements (a view where possible)."""
        if self.dtype is not None:
            if data.storage_offset() % self.dtype.itemsize:
                data = data.clone()  # a dtype view needs an aligned start
            return data[: data.numel() - data.numel() % self.dtype.itemsize].view(self.dtype)
        return torch.cat([data[s:e].clone().view(dt).float() for s, e, dt in self.tensors])

    @classmethod
    def build(cls, header: dict, plan: AdapterPlan, num_layers: int) -> _Layout:
        entries = sorted((info["data_offsets"][0], info["data_offsets"][1], key, info)
                         for key, info in header.items() if key != "__metadata__")
        dtypes = {DTYPES[info["dtype"]] for *_, info in entries}
        uniform = dtypes.pop() if len(dtypes) == 1 else None
        if uniform is not None and any(s % uniform.itemsize for s, *_ in entries):
            uniform = None
        starts: dict[tuple[int, str, str], tuple[int, list[int]]] = {}  # -> (element start, shape)
        cursor = 0
        for s, e, key, info in entries:
            m = LORA_KEY.match(key)
            dt = DTYPES[info["dtype"]]
            first = s // dt.itemsize if uniform is not None else cursor
            cursor += (e - s) // dt.itemsize
            if m is not None:
                starts[(int(m.group(1)), m.group(2), m.group(3))] = (first, info["shape"])
        pieces = []
        for (module, kind), first, count in plan_runs(plan.rows):
            base = torch.tensor([starts[(layer, module, kind.upper())][0]
                                 for layer in range(num_layers)], dtype=torch.int64)[:, None, None]
            rows, cols = starts[(0, module, kind.upper())][1]  # A: [r, in]; B: [out, r]
            j = torch.arange(first, first + count, dtype=torch.int64)[None, :, None]
            if kind == "a":  # row j of A: cols consecutive elements
                idx = base + j * cols + torch.arange(cols, dtype=torch.int64)[None, None, :]
            else:  # row j of B^T = column j of B: one element every `cols` (= r)
                idx = base + j + cols * torch.arange(rows, dtype=torch.int64)[None, None, :]
            pieces.append(idx.reshape(num_layers, -1))
        index = torch.cat(pieces, dim=1).reshape(-1)
        tensors = [(s, e, DTYPES[info["dtype"]]) for s, e, _, info in entries]
        return cls(index, tensors, uniform)


def plan_runs(rows: Sequence[PlannedRow]) -> Iterator[tuple[tuple[str, str], int, int]]:
    """Maximal runs of planned rows of one module and kind with consecutive indices, in order:
    ((module, kind), first index, count)."""
    run: list = []
    for r in rows:
        if run and run[0] == (r.module, r.kind) and r.index == run[1] + run[2]:
            run[2] += 1
            continue
        if run:
            yield run[0], run[1], run[2]
        run = [(r.module, r.kind), r.index, 1]
    if run:
        yield run[0], run[1], run[2]


def _read_file(path: Path) -> torch.Tensor:
    """The whole file as uint8, read in as few calls as the OS allows (each releases the GIL)."""
    size = path.stat().st_size
    buf = torch.empty(size, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                raise ValueError(f"{path.name} ended after {got} of {size} bytes")
            got += n
    return buf
