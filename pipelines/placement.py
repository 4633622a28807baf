"""Where each variant's weights live on the device (its memory mode), and whether a request fits.

Torch-free except `text_encoders_on`: the server's admission path calls `check_fits` through
Engine.prepare. The arithmetic is pipelines/memory.py's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from . import memory
from .errors import InvalidRequest
from .request import ResolvedRequest
from .variants import HD_SIZES, VARIANTS

MEMORY_MODES = ("auto", *memory.MODES)
# Modes that change how the models run, not only where they are: they apply on a CPU engine too
# (streaming onto the CPU itself), so their exactness is tested there.
IN_PROCESS_MODES = ("stream_text", "stream")


class Placement:
    """Memory modes and fit checks for one device of `capacity` bytes (None: CPU, no limit).

    `memory_mode`: auto (per variant, the fastest mode in which its largest request fits) or one of
    memory.MODES for every variant. `host_capacity`: bytes of host RAM (None: not checked), for the
    modes that keep weights there.
    """

    def __init__(
        self,
        capacity: int | None,
        memory_mode: str = "auto",
        cfg_batch: bool = True,
        vae_tiling=False,
        host_capacity: int | None = None,
    ):
        if memory_mode not in MEMORY_MODES:
            raise ValueError(f"memory mode must be one of {', '.join(MEMORY_MODES)}, got {memory_mode!r}")
        self.capacity = capacity
        self.memory_mode = memory_mode
        self.cfg_batch = cfg_batch
        self.vae_tiling = vae_tiling  # forced on (--vae-tiling); else the plan decides per request
        self.host_capacity = host_capacity

    def mode(self, name: str) -> str:
        """Variant `name`'s memory mode, decided before it is loaded: the fastest in which its largest
        request (largest size, longest clip) fits; else the fastest for its largest SD request; else
        the most frugal (requests that fit nothing are refused at submit)."""
        if self.capacity is None:  # CPU: no limit, one device
            return self.memory_mode if self.memory_mode in IN_PROCESS_MODES else "gpu"
        if self.memory_mode != "auto":
            return self.memory_mode
        v = VARIANTS[name]
        sizes = v.sizes or ((memory.VAE_TILE, memory.VAE_TILE),)
        sd = [s for s in sizes if s not in HD_SIZES] or list(sizes)
        largest = [max(sizes, key=lambda s: s[0] * s[1]), max(sd, key=lambda s: s[0] * s[1])]
        for w, h in largest:
            fp = memory.plan(v, w, h, v.max_frames, self.capacity, host_capacity=self.host_capacity)
            if fp is not None:
                return fp.mode
        return memory.frugal(v, *largest[1], v.max_frames, host_capacity=self.host_capacity).mode

    def plan(self, r: ResolvedRequest, resident: int = 0) -> memory.Footprint | None:
        """The plan for this request under its variant's mode (None: it does not fit). `resident`:
        bytes other variants keep on the device meanwhile (pipelines/residency.py)."""
        return self.plan_size(r.variant.name, r.width, r.height, r.num_frames, resident)

    def plan_size(self, name: str, width: int, height: int, frames: int, resident: int = 0) -> memory.Footprint | None:
        """`plan` for variant `name` at a size rather than for a request."""
        tiling = True if self.vae_tiling else None
        v, mode = VARIANTS[name], self.mode(name)
        return memory.plan(
            v, width, height, frames, self.capacity, mode, self.cfg_batch, tiling, self.host_capacity, resident=resident
        )

    def check_fits(self, r: ResolvedRequest) -> None:
        """Raise InvalidRequest naming num_frames (if fewer would fit) or width when `r` cannot fit."""
        if self.capacity is None or self.plan(r) is not None:
            return
        mode = self.mode(r.variant.name)
        host = self.host_capacity
        message = memory.no_fit_message(r.variant, r.width, r.height, r.num_frames, self.capacity, mode, host)
        if memory.max_frames_that_fit(r.variant, r.width, r.height, self.capacity, mode, host):
            raise InvalidRequest("num_frames", r.num_frames, message)
        raise InvalidRequest("width", r.width, message)


def plan_dict(fp: memory.Footprint | None) -> dict:
    """The plan as GenerationResult.memory_plan reports it ({} when there is none)."""
    if fp is None:
        return {}
    return {
        "mode": fp.mode,
        "cfg_batch": fp.cfg_batch,
        "vae_tiling": fp.vae_tiling,
        "estimated_peak_gib": round(fp.peak / memory.GiB, 2),
        "ffn_chunks": fp.ffn_chunks,
        "host_gib": round(fp.host / memory.GiB, 2),
    }


@contextlib.contextmanager
def text_encoders_on(pipe, device: str) -> Iterator[None]:
    """offload_text placement: the text encoders come onto the GPU for an encode, then leave.

    Whenever they sit on the CPU of a CUDA engine (offload_model too, where accelerate's hooks
    would also move them); a no-op when they are already on the device, and on a CPU engine.
    """
    encoder = pipe.text_encoder
    parked = getattr(encoder, "device", None) is not None and encoder.device.type == "cpu"
    streamed = getattr(encoder, "_k5_streamed", False)  # streaming.py moves it leaf by leaf itself
    if not (parked and device.startswith("cuda")) or streamed:
        yield
        return
    pipe.text_encoder.to(device)
    pipe.text_encoder_2.to(device)
    try:
        yield
    finally:
        pipe.text_encoder.to("cpu")
        pipe.text_encoder_2.to("cpu")
