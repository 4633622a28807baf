"""One video across several devices: the engine a worker process builds for a group of devices.

`build_engine(devices, **engine_kwargs)` is what a worker process calls (server side: the worker
pool): the plain Engine for one device, a GroupEngine for several. A GroupEngine is rank 0 of a
torch.distributed group (NCCL on CUDA, gloo on the CPU; loopback rendezvous on a free port) and the
group's face to the server (server/engine_protocol.py EngineLike): it spawns ranks 1..N-1 itself
(pipelines/member.py `rank_main`), hands each admitted request to them, encodes the prompt
(broadcast to the ranks), denoises its share (pipelines/ulysses.py: Ulysses sequence parallelism;
CFG parallel for guidance > 1), then decodes and writes the mp4 alone. Progress and phases are
reported from rank 0; cancel is honoured at each step on every rank.

Failure: a rank that dies surfaces as WorkerLost (its pipe closes, or a collective fails: a closed
peer at once on gloo, the collective timeout otherwise); any failure mid-run tears the group down
(ranks out of step cannot be trusted) and the next job starts it again. A refusal or a load error
before the denoising leaves the group as it was.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import socket
import threading
from pathlib import Path

from .cancel import Cancellation, CancelToken
from .errors import Cancelled, InvalidRequest
from .generation import LOADING
from .request import GenerationRequest, GenerationResult, ResolvedRequest
from .variants import sp_degree_problem

log = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 600.0  # one collective (gloo: a dead peer fails it at once; NCCL: only at this limit)
POLL_S = 0.2


def build_engine(devices: list[str], **engine_kwargs):
    """The engine for a worker that owns `devices`: Engine for one, GroupEngine for several.

    GroupEngine takes two keywords of its own: `cfg_parallel` (default True) and `timeout_s` (one
    collective's limit). Raises ValueError for a degree the served variants cannot split into."""
    if len(devices) == 1:
        from .engine import Engine

        engine_kwargs.pop("cfg_parallel", None)
        engine_kwargs.pop("timeout_s", None)
        return Engine(device=devices[0], **engine_kwargs)
    return GroupEngine(list(devices), **engine_kwargs)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class GroupEngine:
    """Rank 0 of a sequence-parallel group (module docstring). Not re-entrant, like Engine."""

    def __init__(
        self,
        devices: list[str],
        *,
        cfg_parallel: bool = True,
        timeout_s: float = COLLECTIVE_TIMEOUT_S,
        **engine_kwargs,
    ):
        from .engine import Engine
        from .member import backend_for
        from .ulysses import Layout

        backend_for(devices)  # one kind of device
        if engine_kwargs.get("offload") or engine_kwargs.get("memory_mode") == "offload_model":
            raise ValueError("model offload cannot run in a sequence-parallel group (each rank holds the transformer)")
        if engine_kwargs.get("compile"):
            log.warning("torch.compile is off in a sequence-parallel group (not yet verified with the collectives)")
        engine_kwargs["compile"] = False
        self.devices = list(devices)
        self.device = "+".join(self.devices)
        self.cfg_parallel = cfg_parallel
        self.timeout_s = timeout_s
        self._kwargs = engine_kwargs
        self.engine = Engine(device=self.devices[0], **engine_kwargs)
        self.demo = self.engine.demo
        problem = sp_degree_problem(self.engine.preparer.runs(), len(self.devices))
        if problem:
            raise ValueError(problem)
        self.member = None
        self._layout = Layout()  # rank 0's, kept across restarts of the group (its pipelines stay loaded)
        self._ranks: list[tuple[multiprocessing.Process, object]] = []
        self._pending: dict[int, tuple[str, object]] = {}  # a rank's reply read early (while joining)
        self._lock = threading.Lock()

    # ---- EngineLike ------------------------------------------------------------------------

    def available(self) -> list[str]:
        return [n for n in self.engine.available() if sp_degree_problem([n], len(self.devices)) is None]

    def prepare(self, req: GenerationRequest) -> ResolvedRequest:
        r = self.engine.prepare(req)
        problem = sp_degree_problem([r.variant.name], len(self.devices))
        if problem:
            raise InvalidRequest("model", req.variant, problem)
        # a clip made in passes or from a source video runs its passes on rank 0 only: the other
        # ranks would wait at the first pass's collectives. Refused until the group runs passes.
        if r.continuation is not None or r.video:
            what = (
                "a video-to-video (remix / edit)"
                if r.video
                else "a clip made in passes (an extension, or longer than one pass)"
            )
            raise InvalidRequest(
                "model",
                req.variant,
                f"{what} does not run on a sequence-parallel group yet; serve it on a single-device worker",
            )
        return r

    def memory_in_use(self) -> int | None:
        return self.engine.memory_in_use()  # rank 0's device

    def describe(self) -> dict:
        described = self.engine.describe()
        described["counters"] = {**described.get("counters", {}), "group_ranks": len(self.devices)}
        return described

    def warmup(self) -> None:
        """Start the ranks and load what will be served on each of them."""
        with self._lock:
            self._start()
            self._send_all(("warmup", None))
            error = _capture(self.engine.warmup)
            replies = self._collect()
            _raise_first(error, replies)

    def generate(
        self,
        req: ResolvedRequest | GenerationRequest,
        output: Path,
        *,
        on_step=None,
        on_phase=None,
        cancel: Cancellation | None = None,
    ) -> GenerationResult:
        """Engine.generate across the group (module docstring)."""
        return self._run(req, Path(output), on_step=on_step, on_phase=on_phase, cancel=cancel)

    def generate_frames(self, req: ResolvedRequest | GenerationRequest, *, on_step=None, on_phase=None, cancel=None):
        """Engine.generate_frames across the group: rank 0's decoded frames (generation.Frames), no file."""
        return self._run(req, None, on_step=on_step, on_phase=on_phase, cancel=cancel)

    def _run(self, req, output: Path | None, *, on_step, on_phase, cancel: Cancellation | None):
        cancel = cancel if cancel is not None else CancelToken()
        r = req if isinstance(req, ResolvedRequest) else self.prepare(req)
        cancel.raise_if_cancelled()
        if on_phase is not None:
            on_phase(LOADING, 0, 1)  # every rank loads its share first; the leader's engine says it again
        with self._lock:
            self._start()
            self._load(r, cancel)
            try:
                result = self.member.run(self.engine, r, output, on_step=on_step, on_phase=on_phase, cancel=cancel)
            except Cancelled:
                self._collect()  # the ranks stopped at the same step ("cancelled"), or had finished
                raise
            except BaseException as exc:
                lost = self._fail(exc)
                if lost is not None:
                    raise lost from exc
                raise
            _raise_first(None, self._collect())
            return result

    def stop(self) -> None:
        """Shut the ranks down and leave the process group."""
        with self._lock:
            self._stop()

    # ---- the ranks -----------------------------------------------------------------------------

    def _start(self) -> None:
        if self.member is not None:
            return
        from .member import Member, loopback_only, rank_main

        loopback_only()  # before the children start: they inherit it
        port = _free_port()
        ctx = multiprocessing.get_context("spawn")
        for rank in range(1, len(self.devices)):
            here, there = ctx.Pipe()
            args = (rank, self.devices, port, self.timeout_s, self.cfg_parallel, self._kwargs, there)
            proc = ctx.Process(target=rank_main, args=args, name=f"k5serve-rank{rank}")
            proc.start()
            there.close()
            self._ranks.append((proc, here))
        try:
            self.member = self._join(
                lambda: Member(0, self.devices, port, self.timeout_s, self.cfg_parallel, layout=self._layout)
            )
            _raise_first(None, self._collect())  # "ready"
        except BaseException:
            self._stop()
            raise
        log.info("sequence-parallel group on %s ready", self.device)

    def _join(self, make):
        """Rank 0's rendezvous, watched: a rank that fails before it joins (a bad device, an import
        error) would leave it waiting out the whole timeout, so it runs in a thread while this one
        watches the ranks. (A rendezvous given up on stays blocked in its daemon thread until its
        timeout.)"""
        box: dict = {}

        def join() -> None:
            try:
                box["member"] = make()
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=join, name="k5serve-rendezvous", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(POLL_S)
            for rank, (proc, conn) in enumerate(self._ranks, start=1):
                if rank not in self._pending and conn.poll(0):
                    self._pending[rank] = conn.recv()  # "ready", or its error sent before it could join
                    _raise_first(None, [self._pending[rank]])
                if thread.is_alive() and not proc.is_alive():
                    raise self._lost(rank, proc)
        if "error" in box:
            raise box["error"]
        return box["member"]

    def _load(self, r: ResolvedRequest, cancel: Cancellation) -> None:
        """Every rank loads the variant; all go on only if all loaded and no cancel came meanwhile."""
        self._send_all(("job", r))
        error = _capture(lambda: self.member.load(self.engine, r.variant.name))
        replies = self._collect()
        go = error is None and all(kind == "loaded" for kind, _ in replies) and not cancel.cancelled
        self._send_all(("go" if go else "abort", None))
        _raise_first(error, replies)
        cancel.raise_if_cancelled()

    def _send_all(self, message) -> None:
        for rank, (proc, conn) in enumerate(self._ranks, start=1):
            try:
                conn.send(message)
            except OSError as exc:
                raise self._lost(rank, proc) from exc

    def _collect(self) -> list[tuple[str, object]]:
        """One reply from every rank, in rank order; WorkerLost for a rank that died first."""
        replies = []
        for rank, (proc, conn) in enumerate(self._ranks, start=1):
            if rank in self._pending:
                replies.append(self._pending.pop(rank))
                continue
            while not conn.poll(POLL_S):
                if not proc.is_alive() and not conn.poll(0):
                    raise self._lost(rank, proc)
            try:
                replies.append(conn.recv())
            except EOFError as exc:
                raise self._lost(rank, proc) from exc
        return replies

    def _lost(self, rank: int, proc):
        from server.engine_protocol import WorkerLost

        proc.join(1.0)
        lost = WorkerLost(
            f"rank {rank} of the group on {self.device} ({self.devices[rank]}) died (exit code {proc.exitcode})"
        )
        self._stop()
        return lost

    def _fail(self, exc: BaseException):
        """Mid-run failure on rank 0 (or a collective that saw a peer fail). The group is torn down
        either way; returns WorkerLost when a rank had died (a rank's own error, when it sent one,
        is added to `exc` as a note)."""
        lost = None
        for rank, (proc, conn) in enumerate(self._ranks, start=1):
            if conn.poll(1.0):
                try:
                    kind, payload = conn.recv()
                except (EOFError, OSError):
                    kind, payload = "gone", None
                if kind == "error":
                    exc.add_note(f"rank {rank} ({self.devices[rank]}) failed first: {payload!r}")
                    continue
            proc.join(1.0)
            if lost is None and not proc.is_alive():
                lost = self._lost(rank, proc)
        self._stop()
        return lost

    def _stop(self) -> None:
        for _proc, conn in self._ranks:
            with contextlib.suppress(OSError):
                conn.send(("stop", None))
        for proc, conn in self._ranks:
            proc.join(10.0)
            if proc.is_alive():
                proc.kill()
                proc.join(5.0)
            conn.close()
        self._ranks, self._pending = [], {}
        if self.member is not None:
            self.member.leave()
            self.member = None


def _capture(fn) -> BaseException | None:
    try:
        fn()
    except Exception as exc:
        return exc
    return None


def _raise_first(error: BaseException | None, replies: list[tuple[str, object]]) -> None:
    """Rank 0's own error first, else the first rank's."""
    if error is not None:
        raise error
    for kind, payload in replies:
        if kind == "error":
            raise payload
