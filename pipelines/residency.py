"""What is loaded on the engine's device, shared, and moved off it when something else needs room.

One `Residency` per engine. Each loaded model (transformer, text encoders, VAE; tokenizers too,
which hold no device memory) is an Entry keyed by its content id (content.py): a text encoder,
tokenizer or VAE that is byte-identical in several variants is loaded once and every pipeline that
uses it holds the same module. Transformers are never shared (each pipeline's attention set-up and
compiled blocks are its own), and neither is anything under offload_model, whose accelerate hooks
belong to one pipeline.

When a request needs room, the least recently used transformers of other variants leave the device
first, then the other models the request does not use. An evicted model goes to host RAM (pinned
on CUDA, so the swap back is one fast copy, not a disk read) while the host has room; otherwise it
is dropped and every pipeline that used it is forgotten (loaded again from disk when next asked
for). On the CPU the "device" is host RAM already: an evicted model stays where it is, off the
device budget, and coming back costs nothing: the accounting is what is exercised there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .content import SHARED

log = logging.getLogger(__name__)

DEVICE, HOST, OFFLOADED = "device", "host", "offloaded"  # where an entry's weights are now
DEVICE_COMPONENTS = ("transformer", "text_encoder", "text_encoder_2", "vae")  # hold device memory
HOST_RESERVE_FRACTION = 0.1  # of total RAM kept free when deciding whether a host copy fits
HOST_RESERVE_MIN = 2 * 2**30

Key = tuple[str, str, str, str]  # (component, content id, placement, owner: "" when shared)


@dataclass
class Entry:
    component: str
    id: str
    module: Any
    bytes: int
    placement: str
    variants: set[str] = field(default_factory=set)
    where: str = DEVICE
    last_used: int = 0

    def describe(self) -> dict:
        return {"component": self.component, "id": self.id, "bytes": self.bytes, "variants": sorted(self.variants)}


def module_bytes(module: Any) -> int:
    """Bytes of a module's parameters and buffers (0 for a tokenizer)."""
    if not hasattr(module, "parameters"):
        return 0
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def on_device(component: str, placement: str) -> bool:
    """Whether `component` lives on the device between calls under `placement` (loader.configure_pipeline)."""
    if component not in DEVICE_COMPONENTS or placement == "offload_model":
        return False
    return not (placement == "offload_text" and component.startswith("text_encoder"))


def host_available() -> int | None:
    """Bytes of RAM available now less a reserve (Linux /proc/meminfo; None where unknown)."""
    try:
        text = Path("/proc/meminfo").read_text()
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
        total = int(fields["MemTotal"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    return available - max(HOST_RESERVE_MIN, int(HOST_RESERVE_FRACTION * total))


class Residency:
    """The models one engine holds, where they are, and its load/evict/swap counters.

    `host_memory`: bytes of host RAM evicted models may take (None: what the host has available
    when one is evicted, less a reserve). `share`: False gives every pipeline its own copies
    (to compare against, and to measure). Called under the engine's lock only.
    """

    def __init__(self, device: str, host_memory: int | None = None, share: bool = True):
        self.device = device
        self.host_memory = host_memory
        self.share = share
        self.counters: dict[str, float] = {"loads": 0, "evictions": 0, "drops": 0, "swaps": 0, "swap_seconds": 0.0}
        self.listeners: list[Callable[[str, str], None]] = []  # (event, variant) after each load / swap-in
        self._entries: dict[Key, Entry] = {}
        self._clock = 0

    # ---- keys and lookups ----------------------------------------------------------------

    def _key(self, component: str, cid: str, placement: str, variant: str) -> Key:
        shared = self.share and component in SHARED and placement != "offload_model"
        return (component, cid, placement, "" if shared else variant)

    def _of(self, variant: str) -> list[Entry]:
        return [e for e in self._entries.values() if variant in e.variants]

    def shared_for(self, variant: str, ids: Mapping[str, str], placement: str) -> dict[str, Any]:
        """The loaded modules `variant` can use as they are ({component: module}), on the device."""
        found = {}
        for component, cid in ids.items():
            entry = self._entries.get(self._key(component, cid, placement, variant))
            if entry is not None:
                self._bring_back(entry)
                found[component] = entry.module
        return found

    def register(self, variant: str, pipe: Any, ids: Mapping[str, str], placement: str) -> None:
        """Record `variant`'s newly loaded pipeline: its new models count as loads, shared ones gain a user."""
        self._clock += 1
        for component, cid in ids.items():
            module = getattr(pipe, component, None)
            if module is None:
                continue
            key = self._key(component, cid, placement, variant)
            entry = self._entries.get(key)
            if entry is None:
                where = DEVICE if on_device(component, placement) else OFFLOADED
                entry = self._entries[key] = Entry(component, cid, module, module_bytes(module), placement, where=where)
                self.counters["loads"] += component in DEVICE_COMPONENTS
            entry.variants.add(variant)
            entry.last_used = self._clock
        self._notify("load", variant)

    # ---- use, room, eviction -------------------------------------------------------------

    def use(self, variant: str) -> None:
        """`variant` runs now: bring back whatever of it was evicted, and mark it most recently used."""
        self._clock += 1
        swapped = False
        for entry in self._of(variant):
            swapped |= self._bring_back(entry)
            entry.last_used = self._clock
        if swapped:
            self._notify("swap", variant)

    def device_bytes(self, keep: Iterable[tuple[str, str]] = ()) -> int:
        """Bytes on the device, less the models named in `keep` ((component, id) pairs)."""
        keep = set(keep)
        return sum(e.bytes for e in self._entries.values() if e.where == DEVICE and (e.component, e.id) not in keep)

    def evict_one(self, keep: Iterable[tuple[str, str]]) -> list[str] | None:
        """Move the least recently used model not in `keep` off the device: transformers first.

        Returns the variants whose pipelines lost a model for good (dropped for want of host room;
        the caller forgets those pipelines), [] when it went to host RAM, None when nothing is left
        to evict."""
        keep = set(keep)
        candidates = [e for e in self._entries.values() if e.where == DEVICE and (e.component, e.id) not in keep]
        if not candidates:
            return None
        entry = min(candidates, key=lambda e: (e.component != "transformer", e.last_used))
        self.counters["evictions"] += 1
        if self._host_has_room(entry.bytes):
            self._move(entry, HOST)
            log.info(
                "evicted %s %s (%s) to host RAM", entry.component, entry.id[:23], ", ".join(sorted(entry.variants))
            )
            return []
        return self._drop(entry)

    def forget(self, variant: str) -> None:
        """`variant`'s pipeline is gone: its models lose that user. One nobody uses stays where it is
        (the next variant may share it) until room is needed: then it goes like any other."""
        for entry in self._entries.values():
            entry.variants.discard(variant)

    def _drop(self, entry: Entry) -> list[str]:
        users = sorted(entry.variants)
        self.counters["drops"] += 1
        log.info("dropped %s %s (%s): no host RAM to keep it", entry.component, entry.id[:23], ", ".join(users))
        for key, e in list(self._entries.items()):
            if e is entry:
                del self._entries[key]
        for variant in users:
            self.forget(variant)
        for key, e in list(self._entries.items()):
            if key[3] and not e.variants:  # a model of its own of a forgotten pipeline: nobody can use it
                del self._entries[key]
        return users

    # ---- host RAM ------------------------------------------------------------------------

    def host_bytes(self) -> int:
        return sum(e.bytes for e in self._entries.values() if e.where == HOST)

    def _host_has_room(self, nbytes: int) -> bool:
        if self.host_memory is not None:
            return self.host_bytes() + nbytes <= self.host_memory
        if not self.device.startswith("cuda"):
            return True  # on the CPU the copy is already in host RAM: keeping it costs nothing more
        available = host_available()
        return available is not None and nbytes <= available

    def _bring_back(self, entry: Entry) -> bool:
        if entry.where != HOST:
            return False
        self._move(entry, DEVICE)
        return True

    def _move(self, entry: Entry, where: str) -> None:
        t0 = time.perf_counter()
        if self.device.startswith("cuda"):
            import torch

            if where == HOST:
                entry.module.to("cpu")
                for t in [*entry.module.parameters(), *entry.module.buffers()]:
                    t.data = t.data.pin_memory()  # a pinned copy comes back at full PCIe speed
            else:
                entry.module.to(self.device, non_blocking=True)
                torch.cuda.synchronize(self.device)
        entry.where = where
        if where == DEVICE:
            self.counters["swaps"] += 1
            self.counters["swap_seconds"] += time.perf_counter() - t0

    # ---- what is held --------------------------------------------------------------------

    def resident(self) -> list[dict]:
        """The models on the device (engine_protocol `describe()["resident"]`)."""
        return [e.describe() for e in self._sorted() if e.where == DEVICE]

    def host(self) -> list[dict]:
        """The models evicted to host RAM, waiting to come back."""
        return [e.describe() for e in self._sorted() if e.where == HOST]

    def where(self, variant: str, component: str) -> str | None:
        """Where `variant`'s `component` is now (device / host / offloaded), None if not loaded."""
        return next((e.where for e in self._of(variant) if e.component == component), None)

    def _sorted(self) -> list[Entry]:
        order = {c: i for i, c in enumerate(DEVICE_COMPONENTS)}
        # a snapshot: /readyz and /metrics read this from their own threads while a job loads
        entries = [e for e in list(self._entries.values()) if e.component in DEVICE_COMPONENTS]
        return sorted(entries, key=lambda e: (order[e.component], e.id, sorted(e.variants)))

    def _notify(self, event: str, variant: str) -> None:
        for listener in self.listeners:
            listener(event, variant)
