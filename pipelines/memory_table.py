"""The memory planner's answer for every variant on common cards, as a table (torch-free).

`python -m pipelines.memory_table` prints it (docs/memory.md holds a copy; tests/pipelines/
test_memory_plan.py checks the copy is current). Estimates, not measurements: bench/gpu_check.sh
puts measured peaks next to them on a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import memory
from .placement import Placement
from .variants import HD_SIZES, SD_SIZES, VARIANTS

CARDS_GIB = (12, 16, 24, 32, 48, 80)


@dataclass(frozen=True)
class Row:
    variant: str
    size: tuple[int, int]
    frames: int
    card_gib: int
    plan: memory.Footprint | None

    def cells(self) -> list[str]:
        w, h = self.size
        head = [self.variant, f"{w}x{h}", str(self.frames), f"{self.card_gib} GB"]
        p = self.plan
        if p is None:
            return [*head, "does not fit", "", "", ""]
        how = ", ".join(
            x
            for x in (
                "no CFG"
                if VARIANTS[self.variant].guidance <= 1.0
                else "CFG batched"
                if p.cfg_batch
                else "CFG sequential",
                "VAE tiled" if p.vae_tiling else "",
                f"FFN x{p.ffn_chunks}" if p.ffn_chunks > 1 else "",
            )
            if x
        )
        gib = memory.GiB
        return [*head, p.mode, how, f"{p.peak / gib:.1f}", f"{p.host / gib:.0f}"]


def rows(cards: tuple[int, ...] = CARDS_GIB, host_capacity: int | None = None) -> list[Row]:
    """Every real variant at its default clip length, 768x512 and (Pro) 1280x768, on each card: the
    mode the engine picks for the variant (Placement.mode, auto) and the request's plan in it."""
    out = []
    for card in cards:
        placement = Placement(card * memory.GiB, host_capacity=host_capacity)
        for name, v in VARIANTS.items():
            if v.demo:
                continue
            mode = placement.mode(name)
            for size in [SD_SIZES[0]] + ([HD_SIZES[0]] if HD_SIZES[0] in v.sizes else []):
                fp = memory.plan(v, *size, v.max_frames, placement.capacity, mode, host_capacity=host_capacity)
                out.append(Row(name, size, v.max_frames, card, fp))
    return sorted(out, key=lambda r: (list(VARIANTS).index(r.variant), r.size != SD_SIZES[0], r.card_gib))


def markdown(table: list[Row]) -> str:
    head = ["variant", "size", "frames", "card", "mode", "how", "est. peak GiB", "host RAM GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in table]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    print(markdown(rows()), end="")
