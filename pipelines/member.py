"""One rank of a sequence-parallel group: its process group, the split of each request, and the
rank-side loop of a spawned rank (pipelines/group.py is the leader's side).

Per request every rank computes the same layout from the request alone:
- guidance > 1, CFG parallel on and an even group: the cond branch on the first half of the ranks,
  the uncond branch on the second half (each half splits its tokens among itself when it has more
  than one rank); after each transformer call the two halves swap their outputs, so every rank holds
  both and steps the scheduler identically;
- otherwise every rank splits the tokens (degree = the group size), CFG batched as on one device.
Lockstep: the ranks take every decision that could diverge together. Cancel is broadcast from the
leader after each step (all ranks stop at the same step); only after the last step, when the
others are done, does the leader read its caller's token directly (decode, write).
"""

from __future__ import annotations

import logging
import os
import pickle
from dataclasses import fields, replace
from datetime import timedelta

import torch
import torch.distributed as dist

from .cancel import Cancellation, CancelToken
from .denoise import StepRunner, _Stash
from .errors import Cancelled
from .ulysses import Layout, Shard, install

log = logging.getLogger(__name__)


def backend_for(devices: list[str]) -> str:
    kinds = {d.split(":")[0] for d in devices}
    if len(kinds) != 1:
        raise ValueError(f"a group's devices must all be CUDA or all CPU, got {','.join(devices)}")
    return "nccl" if kinds == {"cuda"} else "gloo"


def loopback_only() -> None:
    """Collectives between ranks of one machine go over loopback (gloo's and NCCL's bootstrap would
    otherwise bind the interface the hostname resolves to). A setting of the user's own wins."""
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")


class Member:
    """This process's place in the group; implements generation.Group for the engine."""

    def __init__(
        self,
        rank: int,
        devices: list[str],
        port: int,
        timeout_s: float,
        cfg_parallel: bool = True,
        layout: Layout | None = None,
    ):
        """`layout`: the one this process's transformers were installed with, when a group is
        started again in a process that keeps its pipelines loaded (rank 0 after a failure)."""
        self.rank, self.size, self.devices = rank, len(devices), list(devices)
        self.device = devices[rank]
        self.leader = rank == 0
        self.cfg_parallel = cfg_parallel
        self.layout = layout if layout is not None else Layout()
        self.branch: int | None = None  # 0 cond / 1 uncond in a CFG-parallel request
        self.pair: dist.ProcessGroup | None = None
        backend = backend_for(devices)
        if backend == "nccl":
            torch.cuda.set_device(self.device)
        loopback_only()
        if dist.is_initialized():
            raise RuntimeError("this process already holds a sequence-parallel group (one per worker process)")
        dist.init_process_group(
            backend,
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=self.size,
            timeout=timedelta(seconds=timeout_s),
        )
        self.world = dist.group.WORLD
        # Every rank creates every subgroup, in the same order (new_group is collective).
        half = self.size // 2
        self.halves, self.pairs = [], []
        if self.size % 2 == 0:
            self.halves = [dist.new_group(list(range(b * half, (b + 1) * half))) for b in (0, 1)]
            self.pairs = [dist.new_group([i, i + half]) for i in range(half)]

    # ---- per request -------------------------------------------------------------------------

    def plan(self, guidance: float) -> None:
        """Set this rank's layout for a request with `guidance` (module docstring)."""
        branch, index, degree = split_for(self.rank, self.size, guidance, self.cfg_parallel)
        self.branch = branch
        if branch is None:
            self.pair = None
            self.layout.shard = Shard(self.world, index, degree)
        else:
            self.pair = self.pairs[index]
            self.layout.shard = Shard(self.halves[branch], index, degree) if degree > 1 else None

    def load(self, engine, variant: str):
        """The variant's pipeline on this rank, its transformer split by this group's layout."""
        pipe = engine.pipeline(variant)
        install(pipe.transformer, self.layout)
        return pipe

    def run(self, engine, r, output=None, *, on_step=None, on_phase=None, cancel: Cancellation | None = None):
        """One admitted request on this rank: the leader's whole Engine.generate (its frames only,
        Engine.generate_frames, without `output`), or a follower's share of the denoising. Raises
        Cancelled on every rank at the same step."""
        token = _GroupToken(cancel)

        def step(i: int, n: int) -> None:
            if self._cancel_flag(token.caller):
                token.stop()
                return
            if on_step is not None:
                on_step(i, n)
            if i == n:
                token.free = True  # past the last collective: the leader may stop on its own

        self.plan(r.guidance)
        engine.group = self
        try:
            if self.leader and output is not None:
                return engine.generate(r, output, on_step=step, on_phase=on_phase, cancel=token)
            return engine.generate_frames(r, on_step=step, on_phase=on_phase, cancel=token, decode=self.leader)
        finally:
            engine.group = None
            self.layout.shard, self.branch, self.pair = None, None, None

    def _cancel_flag(self, caller: Cancellation | None) -> bool:
        flag = torch.tensor([int(self.leader and caller is not None and caller.cancelled)], device=self.device)
        dist.broadcast(flag, src=0, group=self.world)
        return bool(flag.item())

    # ---- generation.Group --------------------------------------------------------------------

    def share_prompts(self, encoded: tuple | None) -> tuple:
        box = [_moved(encoded, "cpu") if self.leader else None]
        device = torch.device(self.device) if self.device.startswith("cuda") else None
        dist.broadcast_object_list(box, src=0, group=self.world, device=device)
        return encoded if self.leader else _moved(box[0], self.device)

    def step_runner(self, transformer, negative, *, batch_cfg: bool, magcache):
        if self.branch is None or negative is None:
            return StepRunner(transformer, negative, batch_cfg=batch_cfg, magcache=magcache)
        return CfgParallelRunner(transformer, negative, self.branch, self.pair, magcache=magcache)

    def leave(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def split_for(rank: int, size: int, guidance: float, cfg_parallel: bool = True) -> tuple[int | None, int, int]:
    """(CFG branch or None, this rank's index among the ranks sharing its tokens, their number) for
    a request with `guidance` on a group of `size` (module docstring)."""
    if guidance > 1.0 and cfg_parallel and size % 2 == 0:
        branch, index = divmod(rank, size // 2)
        return branch, index, size // 2
    return None, rank, size


class _GroupToken:
    """The cancel token a rank's engine reads: set by the group's per-step broadcast; the leader's
    caller token counts on its own only once the steps are over (`free`)."""

    def __init__(self, caller: Cancellation | None):
        self.caller = caller
        self.free = False
        self._stop = CancelToken()

    def stop(self) -> None:
        self._stop.cancel()

    @property
    def cancelled(self) -> bool:
        return self._stop.cancelled or (self.free and self.caller is not None and self.caller.cancelled)

    def raise_if_cancelled(self) -> None:
        if self.cancelled:
            raise Cancelled("cancelled")


def _moved(encoded: tuple, device: str) -> tuple:
    """(revised, prompt, negative) with every embedding on `device`."""
    revised, *embeds = encoded
    moved = [
        None if e is None else replace(e, **{f.name: getattr(e, f.name).to(device) for f in fields(e)}) for e in embeds
    ]
    return (revised, *moved)


class CfgParallelRunner(StepRunner):
    """StepRunner for one CFG branch per half of the group: this rank evaluates its branch (the
    pipeline's conditional call), the pair swaps the two results, and the pipeline's unconditional
    call is answered from the swap. The same per-branch evaluation as the sequential (unbatched) run,
    so its output equals that run's; MagCache decides per branch, as upstream does."""

    def __init__(self, transformer, negative, branch: int, pair, magcache=None):
        super().__init__(transformer, negative, batch_cfg=True, magcache=magcache)
        self.branch, self.pair = branch, pair

    def _batched(self, hidden_states, text, timestep, pooled, text_rope_pos, visual_rope_pos, scale, sparse):
        if self.branch == 1:
            neg_text, neg_pooled = self.negative
            text, pooled = neg_text.to(text.dtype), neg_pooled.to(pooled.dtype)
        positions = torch.arange(text.shape[1], device=text.device)  # what the pipeline passes per prompt
        mine = self._evaluate(
            [self.branch], hidden_states, text, timestep, pooled, visual_rope_pos, positions, scale, sparse
        ).contiguous()
        both = [torch.empty_like(mine), torch.empty_like(mine)]
        dist.all_gather(both, mine, group=self.pair)
        self.batched += 1
        self._stash = _Stash(hidden_states, timestep, both[1])
        return both[0]


# ---- a spawned rank ------------------------------------------------------------------------------


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (it crosses to the leader), else a RuntimeError naming it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def rank_main(rank: int, devices: list[str], port: int, timeout_s: float, cfg_parallel: bool, engine_kwargs, conn):
    """Entry point of ranks 1..N-1 (spawned by GroupEngine): join, then serve the leader's messages
    ("job", r) -> "loaded" -> ("go" | "abort") -> "done" | "cancelled"; ("warmup") -> "ok"; ("stop")."""
    from .engine import Engine

    logging.basicConfig(level=logging.WARNING)
    try:
        member = Member(rank, devices, port, timeout_s, cfg_parallel)
        engine = Engine(device=devices[rank], **engine_kwargs)
    except BaseException as exc:
        conn.send(("error", portable(exc)))
        return
    conn.send(("ready", None))
    try:
        while True:
            try:
                kind, payload = conn.recv()
            except EOFError:  # the leader is gone
                break
            if kind == "stop":
                break
            if kind == "warmup":
                _reply(conn, engine.warmup)
            elif kind == "job":
                _follow(member, engine, payload, conn)
    finally:
        member.leave()


def _reply(conn, fn) -> None:
    try:
        fn()
        conn.send(("ok", None))
    except Exception as exc:
        conn.send(("error", portable(exc)))


def _follow(member: Member, engine, r, conn) -> None:
    try:
        member.load(engine, r.variant.name)
        conn.send(("loaded", None))
    except Exception as exc:  # the group stays usable: nobody has entered a collective yet
        conn.send(("error", portable(exc)))
    if conn.recv()[0] != "go":
        return
    try:
        member.run(engine, r)
    except Cancelled:
        conn.send(("cancelled", None))
        return
    except BaseException as exc:
        # Mid-run the ranks are out of step: say why, then leave, so that the others' collectives
        # fail now (a closed peer) rather than at their timeout.
        log.exception("rank %d failed", member.rank)
        conn.send(("error", portable(exc)))
        conn.close()
        os._exit(1)
    conn.send(("done", None))
