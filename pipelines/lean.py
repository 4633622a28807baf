"""Two exact ways to cut a transformer's device memory inside its blocks: FFN chunking and host
(precomputed) modulations.

FFN chunking. A visual block's feed-forward is per token (Linear -> GELU -> Linear), so running it
on pieces of the sequence and concatenating gives the same rows, while the hidden activation (4x
the model width, the largest live tensor of a block) exists for one piece at a time. ComfyUI does
the same for Kandinsky 5 (4 chunks above 8,192 tokens). The number of pieces is set per run from
the memory plan (`ffn_chunks`); 1 is the stock call.

Host modulations. Each block's AdaLN modulation depends only on the time embedding (timestep +
pooled CLIP embedding), the same tensor for every block of one transformer call. So the modulation
layers (fp32, 2.38 B parameters = 9.5 GB of Pro) can stay in host memory: on the first block of a
call all blocks' modulations are computed there at once (per sample, as denoise.py's PerSample
layers do) and copied to the device as one table (9.3 MB per sample for Pro); every block then
reads its row. On the CPU that is the same computation as resident; on CUDA it is the same fp32
math on the host's kernels (rounding-level differences, not bit-identical).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class FfnChunks:
    """Shared by one transformer's chunked feed-forwards: the number of pieces for this run."""

    def __init__(self) -> None:
        self.chunks = 1


def _chunked_class(base):
    class ChunkedFeedForward(base):
        """The stock feed-forward on `state.chunks` pieces of the sequence (dim -2)."""

        def forward(self, x):
            chunks = self._k5_chunks.chunks
            if chunks <= 1 or x.shape[-2] < chunks:
                return super().forward(x)
            return torch.cat([super(ChunkedFeedForward, self).forward(p) for p in x.chunk(chunks, dim=-2)], dim=-2)

    ChunkedFeedForward.__name__ = ChunkedFeedForward.__qualname__ = f"Chunked{base.__name__}"
    return ChunkedFeedForward


def install_ffn_chunking(transformer) -> FfnChunks:
    """Make the visual blocks' feed-forwards chunkable (idempotent; 1 chunk = the stock call)."""
    state = getattr(transformer, "_k5_ffn_chunks", None)
    if state is not None:
        return state
    state = FfnChunks()
    classes: dict[type, type] = {}
    for block in transformer.visual_transformer_blocks:
        ff = block.feed_forward
        cls = classes.setdefault(type(ff), _chunked_class(type(ff)))
        ff.__class__ = cls
        ff._k5_chunks = state
    transformer._k5_ffn_chunks = state
    return state


@contextlib.contextmanager
def ffn_chunks(transformer, chunks: int) -> Iterator[None]:
    """Run `transformer`'s visual FFNs in `chunks` pieces inside the block, then restore."""
    state = getattr(transformer, "_k5_ffn_chunks", None)
    if state is None:
        yield
        return
    previous, state.chunks = state.chunks, chunks
    try:
        yield
    finally:
        state.chunks = previous


class ModulationTable:
    """The visual blocks' modulation layers, kept on `host`, and the table of their outputs for the
    time embedding of the current transformer call."""

    def __init__(self, modules: list[torch.nn.Module], host: str = "cpu"):
        self.modules = [m.to(host) for m in modules]
        self.host = host
        self._key: torch.Tensor | None = None  # the time embedding the table was computed for
        self._rows: torch.Tensor | None = None

    def row(self, index: int, time_embed: torch.Tensor) -> torch.Tensor:
        if self._key is not time_embed:  # one time embedding per transformer call, shared by its blocks
            x = time_embed.to(self.host)
            table = torch.stack([m(x) for m in self.modules])
            self._rows = table.to(time_embed.device)
            self._key = time_embed
        return self._rows[index]

    def clear(self) -> None:
        self._key = self._rows = None


class HostModulation(torch.nn.Module):
    """Stands in for one block's modulation layer: its row of the table (no parameters)."""

    def __init__(self, table: ModulationTable, index: int):
        super().__init__()
        self.table = table
        self.index = index

    @torch.compiler.disable  # a table lookup keyed by tensor identity: not for Dynamo to trace
    def forward(self, time_embed: torch.Tensor) -> torch.Tensor:
        return self.table.row(self.index, time_embed)


def install_host_modulations(transformer, host: str = "cpu") -> ModulationTable:
    """Move the visual blocks' modulation layers to `host`, replacing them by table lookups
    (idempotent). The layers leave the blocks, so block streaming does not move them."""
    table = getattr(transformer, "_k5_modulations", None)
    if table is not None:
        return table
    blocks = transformer.visual_transformer_blocks
    table = ModulationTable([b.visual_modulation for b in blocks], host)
    for i, block in enumerate(blocks):
        block.visual_modulation = HostModulation(table, i)
    transformer._k5_modulations = table
    return table
