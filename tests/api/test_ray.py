"""Workers as Ray actors (issue 13, item 4), on ONE local Ray cluster per module: fake GPUs (a
`num_gpus` resource on a CPU box), bound to loopback, a FakeEngine built inside each actor process
from an importable factory path (tests/ray_fakes.py), exactly where the real engine would be built.

Ray is the `ray` extra, which `make test` installs: without it these tests fail (no skip), so CI
always runs them. Kill points use the fake's pause folders, never sleeps.
"""

from __future__ import annotations

import os
import secrets
import signal
import threading
from pathlib import Path

import pytest

from pipelines.cancel import CancelToken
from pipelines.errors import Cancelled, InvalidRequest, OutOfMemory
from pipelines.request import GenerationRequest
from server.engine_protocol import WorkerLost

TESTS = Path(__file__).resolve().parents[1]
FACTORY = "ray_fakes:fake_engine"
FAKE_GPUS = 2


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node cluster started here: 2 fake GPUs, loopback only, no dashboard (a test may add a node)."""
    # Ray picks the host's outward address unless told to stay local; this must precede `import ray`.
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    # token auth on (Ray's default) with a token of our own: no ~/.ray/auth_token left behind
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(16)
    # the actors (started by the raylet, which inherits this environment) import ray_fakes and fakes
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(TESTS.parent), str(TESTS), saved) if p)
    import ray  # the `ray` extra; an ImportError here fails the module, as it should in CI
    from ray.cluster_utils import Cluster  # a head here; tests may add nodes (test_a_lost_node...)

    from server.ray_cluster import connect

    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 4,
            "num_gpus": FAKE_GPUS,
            "include_dashboard": False,
            # a removed node is marked dead within ~1 s instead of ~15 (test_a_lost_node...)
            "_system_config": {"health_check_period_ms": 200, "health_check_failure_threshold": 3},
        },
    )
    connect(cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if saved is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = saved


@pytest.fixture
def engines(ray_cluster):
    """Make RayEngines (started); every one is killed after the test, freeing its fake GPUs."""
    from server.ray_engine import RayEngine

    made: list[RayEngine] = []

    def make(worker_id: str, gpus: int = 1, **engine_kwargs: object) -> RayEngine:
        engine = RayEngine(worker_id, ("cuda",) * gpus, factory=FACTORY, engine_kwargs=engine_kwargs)
        made.append(engine)
        engine.start()
        engine.warmup()
        return engine

    yield make
    for engine in made:
        engine.kill()


def ray_cluster_nodes() -> list[dict]:
    import ray

    return ray.nodes()


def _request(engine, steps: int = 4):
    return engine.prepare(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=steps, seed=7))


def _wait_for(path: Path, timeout: float = 20.0) -> None:
    event = threading.Event()
    while not path.exists() and not event.wait(0.02):
        timeout -= 0.02
        assert timeout > 0, f"{path} never appeared"


class Running:
    """engine.generate in a thread: the test acts while it runs, then reads what it returned or raised."""

    def __init__(self, engine, request, output: Path, cancel: CancelToken | None = None):
        self.steps: list[tuple[int, int]] = []
        self.phases: list[tuple[str, int, int]] = []
        self.result = self.error = None

        def go() -> None:
            try:
                self.result = engine.generate(
                    request,
                    output,
                    on_step=lambda i, n: self.steps.append((i, n)),
                    on_phase=lambda p, i, n: self.phases.append((p, i, n)),
                    cancel=cancel,
                )
            except Exception as exc:
                self.error = exc

        self.thread = threading.Thread(target=go, daemon=True)
        self.thread.start()

    def join(self) -> None:
        self.thread.join(30)
        assert not self.thread.is_alive(), "generate did not return"


def test_actor_runs_the_engine_and_the_mp4_comes_back(engines, tmp_path):
    engine = engines("one", decode_chunks=2)
    assert engine.alive and engine.pid != os.getpid() and engine.node == "127.0.0.1"
    assert engine.device == "cuda:0" or engine.device == "cuda:1"  # the fake GPU Ray gave it
    assert engine.demo and "kandinsky5-tiny-t2v" in engine.available()
    run = Running(engine, _request(engine), tmp_path / "out.mp4")
    run.join()
    assert run.error is None
    assert run.steps == [(i, 4) for i in range(1, 5)]
    before = [("loading", 0, 1), ("encoding", 0, 1)]
    assert run.phases == [*before, ("decoding", 0, 2), ("decoding", 1, 2), ("decoding", 2, 2), ("writing", 0, 1)]
    data = (tmp_path / "out.mp4").read_bytes()
    assert data.startswith(b"\x00\x00\x00\x18ftyp") and run.result.file_size == len(data)
    assert run.result.path == tmp_path / "out.mp4" and not (tmp_path / "out.mp4.part").exists()
    assert engine.describe()["variants"] == ["kandinsky5-tiny-t2v"]


def test_two_actors_generate_at_once_on_their_own_gpus(engines, tmp_path):
    a, b = (tmp_path / "a", tmp_path / "b")
    a.mkdir(), b.mkdir()
    first = engines("a", pause_at="step", pause_dir=str(a))
    second = engines("b", pause_at="step", pause_dir=str(b))
    assert {first.device, second.device} == {"cuda:0", "cuda:1"} and first.pid != second.pid
    runs = [Running(e, _request(e), tmp_path / f"{e.worker_id}.mp4") for e in (first, second)]
    _wait_for(a / "paused-step")
    _wait_for(b / "paused-step")  # both runs are inside their engines now, neither finished
    assert all(r.result is None and r.error is None for r in runs)
    (a / "release").touch(), (b / "release").touch()
    for run in runs:
        run.join()
        assert run.error is None and run.steps[-1] == (4, 4)
    assert (tmp_path / "a.mp4").read_bytes() != b"" and (tmp_path / "b.mp4").exists()


def test_cancel_reaches_the_actor_mid_run(engines, tmp_path):
    engine = engines("cancel", pause_at="step", pause_dir=str(tmp_path))
    token = CancelToken()
    run = Running(engine, _request(engine, steps=8), tmp_path / "out.mp4", cancel=token)
    _wait_for(tmp_path / "paused-step")  # paused after step 1: only the cancel can end the wait
    token.cancel()
    run.join()
    assert isinstance(run.error, Cancelled) and run.steps == [(1, 8)]
    assert not (tmp_path / "out.mp4").exists()
    assert engine.alive  # a cancel ends the run, not the worker


def test_actor_killed_mid_run_raises_worker_lost(engines, tmp_path):
    engine = engines("doomed", pause_at="step", pause_dir=str(tmp_path))
    run = Running(engine, _request(engine), tmp_path / "out.mp4")
    _wait_for(tmp_path / "paused-step")
    os.kill(engine.pid, signal.SIGKILL)  # the process /readyz names: a crash, an OOM kill, a lost node
    run.join()
    assert isinstance(run.error, WorkerLost) and str(engine.pid) in str(run.error)
    assert not engine.alive and not (tmp_path / "out.mp4").exists()
    with pytest.raises(WorkerLost):
        engine.describe()


def test_a_lost_node_loses_only_its_workers(ray_cluster, engines, tmp_path):
    here = [engines("head-0"), engines("head-1")]  # the head's two fake GPUs
    node = ray_cluster.add_node(num_cpus=2, num_gpus=1)
    remote = engines("remote", pause_at="step", pause_dir=str(tmp_path))  # only the new node has a GPU left
    assert remote.node_id not in {e.node_id for e in here}
    run = Running(remote, _request(remote), tmp_path / "out.mp4")
    _wait_for(tmp_path / "paused-step")
    ray_cluster.remove_node(node, allow_graceful=False)  # the machine is gone, mid-job
    run.join()
    assert isinstance(run.error, WorkerLost) and not remote.alive
    for engine in here:  # the head's workers never noticed
        assert engine.alive
        ok = Running(engine, _request(engine), tmp_path / f"{engine.worker_id}.mp4")
        ok.join()
        assert ok.error is None
    # later tests plan workers from ray.nodes(): wait until the cluster has marked the node dead
    from server_fixtures import wait_until

    gone = node.node_id
    wait_until(
        lambda: not any(n["Alive"] for n in ray_cluster_nodes() if n["NodeID"] == gone), timeout=60, what="node death"
    )


def test_alive_can_be_asked_while_the_actor_starts(ray_cluster):
    """/readyz asks every worker's `alive` while a restart is under way (a bug: it raised then)."""
    from server.ray_engine import RayEngine

    engine = RayEngine("slow", ("cuda",), factory=FACTORY, engine_kwargs={"build_time": 0.3})
    starting = threading.Thread(target=engine.start)
    starting.start()
    answers = []
    while starting.is_alive():
        answers.append(engine.alive)  # raises nothing; False until the actor has answered
    starting.join()
    try:
        assert answers and answers[0] is False and engine.alive
    finally:
        engine.kill()


def test_engine_errors_cross_as_their_own_types(engines):
    engine = engines("errors")
    with pytest.raises(InvalidRequest) as caught:
        engine.prepare(GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a fox", steps=0))
    assert caught.value.field == "steps"


def test_an_engine_that_cannot_be_built_says_why(ray_cluster):
    from server.ray_engine import RayEngine

    broken = RayEngine("broken", ("cuda",), factory="ray_fakes:no_such_factory")
    with pytest.raises(RuntimeError, match="no_such_factory"):
        broken.start()  # its own error, not WorkerLost: restarting would not help
    assert not broken.alive
    failing = RayEngine("failing", ("cuda",), factory=FACTORY, engine_kwargs={"warmup_error": OutOfMemory("no room")})
    try:
        failing.start()
        with pytest.raises(OutOfMemory, match="no room"):
            failing.warmup()
    finally:
        failing.kill()


def test_a_group_is_packed_on_one_node_and_waits_for_free_gpus(engines):
    from server.ray_engine import RayEngine

    group = engines("group", gpus=2)
    assert group.device == "cuda:0+cuda:1"  # both fake GPUs, one actor, one node
    late = RayEngine("late", ("cuda",), factory=FACTORY, start_timeout=0.5)
    with pytest.raises(WorkerLost, match="no node had"):
        late.start()  # every GPU is held by the group: the placement group cannot be placed
    group.stop()
    assert not group.alive
    engines("after")  # the group's GPUs were given back


def test_plan_one_worker_per_gpu_or_per_group_on_one_node():
    from server.ray_cluster import plan

    nodes = [
        {"NodeManagerAddress": "10.0.0.2", "NodeID": "b", "Alive": True, "Resources": {"GPU": 8.0, "CPU": 64.0}},
        {"NodeManagerAddress": "10.0.0.1", "NodeID": "a", "Alive": True, "Resources": {"GPU": 2.0}},
        {"NodeManagerAddress": "10.0.0.3", "NodeID": "c", "Alive": False, "Resources": {"GPU": 8.0}},
        {"NodeManagerAddress": "10.0.0.4", "NodeID": "d", "Alive": True, "Resources": {"CPU": 8.0}},
    ]
    assert [w for w, _ in plan(nodes)] == ["ray-10.0.0.1-0", "ray-10.0.0.1-1"] + [f"ray-10.0.0.2-{k}" for k in range(8)]
    grouped = plan(nodes, sp_degree=4)  # the 2-GPU node cannot hold a group of 4
    assert grouped == [("ray-10.0.0.2-0", ("cuda",) * 4), ("ray-10.0.0.2-1", ("cuda",) * 4)]
    with pytest.raises(ValueError, match="sp_degree"):
        plan(nodes, sp_degree=0)
    twins = [{**nodes[1], "NodeID": "a1b2c3d4e5"}, {**nodes[1], "NodeID": "f6e5d4c3b2"}]  # two raylets, one host
    assert [w for w, _ in plan(twins)] == [f"ray-10.0.0.1-{n}-{k}" for n in ("a1b2c3d4", "f6e5d4c3") for k in (0, 1)]


def test_a_loopback_head_keeps_the_driver_on_loopback():
    from server.ray_cluster import _loopback

    assert _loopback("127.0.0.1:6379") and _loopback("ray://localhost:10001") and _loopback("[::1]:6379")
    assert not _loopback("10.0.0.1:6379") and not _loopback("head.example:6379")


def test_one_machine_never_imports_ray_and_a_missing_extra_is_named():
    """In a fresh interpreter: the front end's Ray modules import neither ray nor torch, and
    --ray-address without the extra says how to install it."""
    import subprocess
    import sys

    script = (
        "import sys; import server.app, server.ray_engine, server.ray_cluster as rc\n"
        "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n"
        "sys.modules['ray'] = None  # as if the extra were not installed\n"
        "try:\n    rc.connect('auto')\nexcept rc.RayUnavailable as exc:\n    print(exc)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "--ray-address needs Ray: pip install 'k5serve[ray]'"


# ---- through the HTTP API: the worker pool driving Ray actors -------------------------------------------


def test_two_actors_serve_two_jobs_at_once_and_a_killed_actors_job_runs_again(ray_cluster, tmp_path):
    from fakes import FakeEngine
    from server_fixtures import app_client, wait_until

    from server.devices import WorkerSpec
    from server.pool import FrontEngine, Workers
    from server.ray_engine import RayEngine

    pauses = {name: tmp_path / name for name in ("ray-a", "ray-b")}
    for folder in pauses.values():
        folder.mkdir()

    def factory(spec: WorkerSpec) -> RayEngine:  # what ray_cluster.ray_workers makes, with a fake engine
        kwargs = {"pause_at": "step", "pause_dir": str(pauses[spec.id])}
        return RayEngine(spec.id, spec.devices, factory=FACTORY, engine_kwargs=kwargs)

    specs = [WorkerSpec("ray-a", ("cuda",)), WorkerSpec("ray-b", ("cuda",))]
    workers = Workers(specs, factory, FrontEngine(FakeEngine()))
    with app_client(workers, tmp_path / "data") as client:
        ids = [
            client.post("/fal-ai/kandinsky5/text-to-video", json={"prompt": p, "num_inference_steps": 4}).json()[
                "request_id"
            ]
            for p in ("first", "second")
        ]
        for folder in pauses.values():  # both jobs are inside their actors at once
            wait_until(lambda f=folder: (f / "paused-step").exists(), timeout=30, what=f"{folder.name} running")
        rows = {w["id"]: w for w in client.get("/readyz").json()["workers"]}
        assert {r["state"] for r in rows.values()} == {"busy"} and {r["job"] for r in rows.values()} == set(ids)
        assert all(r["node"] == "127.0.0.1" and r["pid"] not in (None, os.getpid()) for r in rows.values())
        doomed = rows["ray-a"]
        os.kill(doomed["pid"], signal.SIGKILL)  # mid-job: its job goes back to the queue
        for folder in pauses.values():
            (folder / "release").touch()  # the survivors, and any restarted actor, run to the end
        for rid in ids:
            wait_until(
                lambda r=rid: client.get(f"/fal-ai/kandinsky5/requests/{r}/status").json()["status"] == "COMPLETED",
                timeout=60,
                what=f"{rid} completed",
            )
            video = client.get(client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()["video"]["url"])
            assert video.status_code == 200 and video.content.startswith(b"\x00\x00\x00\x18ftyp")
        after = {w["id"]: w for w in client.get("/readyz").json()["workers"]}
        assert after["ray-a"]["restarts"] == 1 and after["ray-a"]["pid"] != doomed["pid"]
        assert after["ray-b"]["restarts"] == 0


def test_ray_address_lays_out_one_worker_per_gpu_or_per_group(ray_cluster, tmp_path):
    """`k5serve serve --ray-address ADDR [--sp-degree N]`: the pool's layout and factory (no actor started)."""
    from server.ray_cluster import RayUnavailable, ray_workers
    from server.ray_engine import RayEngine
    from server.settings import Settings

    settings = Settings(ray_address=ray_cluster.address, engine_factory=FACTORY, weights_dir=tmp_path)
    workers = ray_workers(settings)
    assert [(s.id, s.devices) for s in workers.specs] == [
        ("ray-127.0.0.1-0", ("cuda",)),
        ("ray-127.0.0.1-1", ("cuda",)),
    ]
    engine = workers.factory(workers.specs[0])
    assert isinstance(engine, RayEngine) and engine.factory == FACTORY and not engine.alive
    assert engine.engine_kwargs == settings.engine_options()
    assert workers.front.demo  # no checkpoint in the weights folder: admission serves the tiny stand-ins
    paired = ray_workers(settings.model_copy(update={"sp_degree": 2}))
    assert [s.devices for s in paired.specs] == [("cuda", "cuda")]  # one group, on the node that has both
    with pytest.raises(RayUnavailable, match="no node with 4 GPUs"):
        ray_workers(settings.model_copy(update={"sp_degree": 4}))
    with pytest.raises(ValueError, match="--devices and --ray-address exclude each other"):
        ray_workers(settings.model_copy(update={"devices": "cpu,cpu"}))


def test_ray_address_setting(monkeypatch):
    from server.settings import Settings

    monkeypatch.setenv("K5SERVE_RAY_ADDRESS", " auto ")
    assert Settings().ray_address == "auto"
    monkeypatch.setenv("K5SERVE_RAY_ADDRESS", "")
    assert Settings().ray_address is None  # unset or blank: no Ray
    assert Settings(ray_address="10.0.0.1:6379").ray_address == "10.0.0.1:6379"


def test_k5serve_serve_ray_address_serves_through_the_cluster(ray_cluster, tmp_path):
    """The command line end to end: `k5serve serve --ray-address ADDR` joins this module's cluster as a
    second driver, places one worker per fake GPU, and a fal job made by an actor downloads."""
    from server_fixtures import server_process, wait_until

    server = server_process(
        tmp_path,
        fake=False,
        run_port=False,
        weights_dir=tmp_path / "no-weights",  # demo: admission serves the tiny stand-ins
        extra=["--ray-address", ray_cluster.address],
        env={"K5SERVE_ENGINE_FACTORY": FACTORY},  # the actors build a fake (they import ray_fakes)
    )
    server.start(timeout=180)  # actors start slowly on a loaded 2-core box (90 s once ran out under -n 2)
    try:
        with server.client() as client:
            rows = client.get("/readyz").json()["workers"]
            assert [(r["id"], r["node"]) for r in rows] == [(f"ray-127.0.0.1-{k}", "127.0.0.1") for k in range(2)]
            rid = client.post("/fal-ai/kandinsky5/text-to-video", json={"prompt": "a fox"}).json()["request_id"]
            status = f"/fal-ai/kandinsky5/requests/{rid}/status"
            wait_until(lambda: client.get(status).json()["status"] == "COMPLETED", timeout=60, what="the job")
            video = client.get(client.get(f"/fal-ai/kandinsky5/requests/{rid}").json()["video"]["url"])
            assert video.status_code == 200 and video.content.startswith(b"\x00\x00\x00\x18ftyp")
    finally:
        server.stop()
    # as without Ray: uvicorn shuts down (the pool stops its actors), then re-raises the SIGTERM
    assert "Application shutdown complete" in server.log_tail()
    assert server.proc.returncode == -signal.SIGTERM, server.log_tail()
