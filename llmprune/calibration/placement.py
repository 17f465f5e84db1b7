"""Where calibration runs: the windows per block forward (`auto_batch_size`), where the activations live
(`choose_activation_device`), and moving a block (or the model outside its blocks) to the accelerator and back
into the same host memory.

`move_block`/`return_block` do it synchronously. `BlockShuttle` overlaps the transfers with the computation on
a CUDA device: while block i runs, block i+1 is copied to the device and block i-1 is copied back, on a side
stream driven by one worker thread (copies to and from pageable host memory block the thread that issues
them, and torch releases the GIL while they run)."""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn


def auto_batch_size(tokens: torch.Tensor) -> int:
    """Calibration windows per block forward: about 16k tokens at a time."""
    return max(1, min(tokens.shape[0], 16384 // max(1, tokens.shape[1])))


def choose_activation_device(tokens: torch.Tensor, hidden_size: int, dtype: torch.dtype, device: torch.device,
                             policy: str = "auto", copies: int = 2) -> torch.device:
    """Where the calibration activations live (`--offload-activations`): `cpu`, `device`, or `auto`: on a CUDA
    accelerator when `copies` activations of every window (inputs and outputs: 2) fit in half its free memory,
    else in host memory."""
    if device.type == "cpu" or policy == "cpu":
        return torch.device("cpu")
    if policy == "device":
        return device
    if device.type != "cuda":
        return torch.device("cpu")
    need = copies * tokens.numel() * hidden_size * torch.tensor([], dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    return device if need < 0.5 * free else torch.device("cpu")


def _tensors(block: nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(block.named_parameters())
    tensors.update(block.named_buffers())
    return tensors


def on_device(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` lives on `device`, reading "cuda" (no index) as the current CUDA device."""
    if t.device.type != device.type:
        return False
    if device.index is None:
        return device.type != "cuda" or t.device.index == torch.cuda.current_device()
    return t.device.index == device.index


def move_block(block: nn.Module, device: torch.device) -> dict[str, torch.Tensor] | None:
    """Move a block's parameters and buffers to `device`; return their original host tensors (None if already
    there), so `return_block` can copy results back into the same host memory instead of allocating new pages."""
    tensors = _tensors(block)
    if not tensors or on_device(next(iter(tensors.values())), device):
        return None
    home = {name: t.data for name, t in tensors.items()}
    block.to(device)
    return home


def return_block(block: nn.Module, home: dict[str, torch.Tensor] | None, copy: bool = True) -> None:
    """Copy the block's (possibly pruned) tensors back into their original host storage and point them there
    (`copy=False`: the tensors were only read, so just point them back)."""
    if home is None:
        return
    for name, t in _tensors(block).items():
        host = home[name]
        if copy:
            host.copy_(t.data)
        t.data = host


class BlockShuttle:
    """Blocks in host memory, each used on the device in turn: `get(i)` puts block i on the device (waiting for
    its prefetch) and starts copying block i+1; `put(i)` points block i back at its host storage and, when
    `writeback`, copies its device tensors there in the background. `close()` waits for every copy (call it in
    a `finally`). At most three blocks are on the device at once (i-1 going back, i, i+1 coming).

    The copies go through two pinned staging buffers on a side stream, driven by one worker thread: the
    host-side copy between the block's pageable memory and the staging buffer is a plain memcpy, and the
    device copy is a DMA that neither blocks the CUDA driver for the compute thread nor waits for it. The
    worker records how long each transfer took (`transfer_seconds`). On a CPU device, or for blocks already on
    the device, it degrades to `move_block`/`return_block`."""

    def __init__(self, blocks: list[nn.Module], device: torch.device, writeback: bool = True, prefetch: bool = True):
        self.blocks, self.device, self.writeback = blocks, device, writeback
        self.async_ = prefetch and device.type == "cuda"
        self._homes: dict[int, dict[str, torch.Tensor] | None] = {}
        self._coming: dict[int, Future] = {}
        self._going: list[Future] = []
        self.transfer_seconds = {"to_device": 0.0, "to_host": 0.0}
        if self.async_:
            self._stream = torch.cuda.Stream(device)
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llmprune-shuttle")
            self._staging: dict[str, torch.Tensor] = {}  # "in" / "out": pinned uint8 buffers
            self._staging_free: dict[str, torch.cuda.Event | None] = {"in": None, "out": None}

    # -- worker-thread side -------------------------------------------------------------------------------
    def _stage(self, which: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Views of the pinned buffer `which`, one per tensor (shape and dtype alike, 64-byte aligned)."""
        sizes = {k: -(-t.numel() * t.element_size() // 64) * 64 for k, t in tensors.items()}
        total = sum(sizes.values())
        buf = self._staging.get(which)
        if buf is None or buf.numel() < total:
            self._staging[which] = buf = torch.empty(total, dtype=torch.uint8, pin_memory=True)
        views, off = {}, 0
        for k, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            views[k] = buf[off : off + nbytes].view(t.dtype).view(t.shape)
            off += sizes[k]
        return views

    def _fetch(self, i: int):
        tensors = {k: t.data for k, t in _tensors(self.blocks[i]).items()}
        if not tensors or on_device(next(iter(tensors.values())), self.device):
            return None
        t0 = time.perf_counter()
        if self._staging_free["in"] is not None:
            self._staging_free["in"].synchronize()  # the previous block's DMA out of the buffer is done
        pinned = self._stage("in", tensors)
        for k, t in tensors.items():
            pinned[k].copy_(t)
        with torch.cuda.stream(self._stream):
            dev = {k: pinned[k].to(self.device, non_blocking=True) for k in tensors}
            done = torch.cuda.Event()
            done.record(self._stream)
        self._staging_free["in"] = done
        self.transfer_seconds["to_device"] += time.perf_counter() - t0
        return dev, done

    def _send_back(self, dev: dict[str, torch.Tensor], home: dict[str, torch.Tensor], ready: torch.cuda.Event):
        t0 = time.perf_counter()
        pinned = self._stage("out", home)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(ready)  # the block's last use on the compute stream
            for k, t in dev.items():
                pinned[k].copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()
        for k, t in home.items():
            t.copy_(pinned[k])
        self.transfer_seconds["to_host"] += time.perf_counter() - t0

    # -- caller side -----------------------------------------------------------------------------------------
    def get(self, i: int) -> nn.Module:
        block = self.blocks[i]
        if not self.async_:
            self._homes[i] = move_block(block, self.device)
            return block
        fut = self._coming.pop(i, None) or self._pool.submit(self._fetch, i)
        if i + 1 < len(self.blocks) and i + 1 not in self._coming:
            self._coming[i + 1] = self._pool.submit(self._fetch, i + 1)
        got = fut.result()
        if got is None:
            self._homes[i] = None
            return block
        dev, done = got
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(done)
        tensors = _tensors(block)
        self._homes[i] = {name: t.data for name, t in tensors.items()}
        for name, t in tensors.items():
            dev[name].record_stream(compute)  # allocated on the side stream, used on this one
            t.data = dev[name]
        return block

    def put(self, i: int) -> None:
        block, home = self.blocks[i], self._homes.pop(i, None)
        if not self.async_ or home is None:
            return_block(block, home, copy=self.writeback)
            return
        tensors = _tensors(block)
        dev = {name: t.data for name, t in tensors.items()}
        for name, t in tensors.items():
            t.data = home[name]  # host values are final once the copy below has finished (see close())
        if self.writeback:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
            self._going.append(self._pool.submit(self._send_back, dev, home, ready))

    def close(self) -> None:
        """Wait for every transfer; re-raise the first error of a copy back to host memory."""
        if not self.async_:
            return
        errors = []
        for f in [*self._going, *self._coming.values()]:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
        self._going, self._coming = [], {}
        self._pool.shutdown(wait=True)
        if errors:
            raise errors[0]
