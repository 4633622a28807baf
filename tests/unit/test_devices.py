"""Unit tests: --devices / --sp-degree parsing (server/devices.py), torch-free."""

from __future__ import annotations

import pytest

from server.devices import DeviceError, Gpus, WorkerSpec, capacity, parse_devices

GB = 1 << 30
FOUR = Gpus((80 * GB,) * 4)


def devices(text: str, degree: int = 1, gpus: Gpus | None = FOUR) -> list[tuple[str, ...]]:
    return [spec.devices for spec in parse_devices(text, degree, gpus)]


def test_auto_is_every_visible_gpu_else_one_cpu_worker():
    assert devices("auto") == [("cuda:0",), ("cuda:1",), ("cuda:2",), ("cuda:3",)]
    assert devices("auto", gpus=Gpus()) == [("cpu",)]
    assert devices(None, gpus=Gpus()) == [("cpu",)]  # unset: auto
    assert devices("all") == devices("auto")
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        devices("all", gpus=Gpus())


def test_lists_one_device_and_ids_in_order():
    specs = parse_devices("cuda:2, cuda:0", gpus=FOUR)
    assert specs == [WorkerSpec("w0", ("cuda:2",)), WorkerSpec("w1", ("cuda:0",))]
    assert devices("cpu,cpu") == [("cpu",), ("cpu",)]  # several CPU workers: allowed
    assert devices("cpu") == [("cpu",)] and devices("cuda") == [("cuda",)]  # --device as a one-device list


def test_sp_degree_groups_consecutive_devices_and_plus_joins_a_group():
    assert devices("auto", 2) == [("cuda:0", "cuda:1"), ("cuda:2", "cuda:3")]
    assert devices("cpu,cpu", 2) == [("cpu", "cpu")]
    eight = Gpus((80 * GB,) * 8)
    mixed = "cuda:0,cuda:1,cuda:2,cuda:3,cuda:4+cuda:5+cuda:6+cuda:7"
    assert devices(mixed, gpus=eight) == [
        ("cuda:0",),
        ("cuda:1",),
        ("cuda:2",),
        ("cuda:3",),
        ("cuda:4", "cuda:5", "cuda:6", "cuda:7"),
    ]
    assert parse_devices("cuda:0+cuda:1", gpus=FOUR)[0].label == "cuda:0+cuda:1"


@pytest.mark.parametrize(
    ("text", "degree", "message"),
    [
        ("gpu0", 1, "'gpu0' is not cpu, cuda or cuda:N"),
        ("cuda:x", 1, "is not cpu, cuda or cuda:N"),
        ("cuda:0,,cuda:1", 1, "an empty entry"),
        ("cuda:0,cuda:0", 1, "cuda:0 listed more than once"),
        ("cuda:0,cuda:0+cuda:1", 1, "cuda:0 listed more than once"),
        ("cuda:7", 1, "cuda:7 does not exist (4 CUDA GPUs visible)"),
        ("cuda:0,cuda:1,cuda:2", 2, "3 single devices do not split into groups of 2"),
        ("cpu", 0, "--sp-degree must be 1 or more"),
    ],
)
def test_bad_values_are_refused_with_a_message_naming_them(text, degree, message):
    with pytest.raises(DeviceError) as caught:
        parse_devices(text, degree, FOUR)
    assert message in str(caught.value)


def test_capacity_is_the_smallest_device_any_worker_uses():
    gpus = Gpus((80 * GB, 24 * GB))
    assert capacity(parse_devices("cuda:0", gpus=gpus), gpus) == 80 * GB
    assert capacity(parse_devices("auto", gpus=gpus), gpus) == 24 * GB
    assert capacity(parse_devices("cpu,cpu", gpus=gpus), gpus) is None  # the CPU: no limit
    assert capacity(parse_devices("cuda:1", gpus=None), Gpus()) is None  # not probed: unknown


def test_the_cli_takes_devices_and_sp_degree_flags_and_environment(monkeypatch):
    from server import cli

    seen = {}
    monkeypatch.setattr("server.app.run", lambda settings: seen.setdefault("s", settings) and 0)
    assert cli.main(["serve", "--devices", "cpu,cpu", "--sp-degree", "2"]) == 0
    assert (seen["s"].devices, seen["s"].sp_degree) == ("cpu,cpu", 2)
    seen.clear()
    monkeypatch.setenv("K5SERVE_DEVICES", "cuda:0,cuda:1")
    monkeypatch.setenv("K5SERVE_SP_DEGREE", "2")
    assert cli.main(["serve"]) == 0
    assert (seen["s"].devices, seen["s"].sp_degree) == ("cuda:0,cuda:1", 2)


def test_a_bad_device_list_stops_serve_with_its_message(monkeypatch, tmp_path, capsys):
    from server import cli

    monkeypatch.setattr("server.app.use_json_logs", lambda: None)
    code = cli.main(["serve", "--devices", "cpu,tpu", "--data-dir", str(tmp_path)])
    assert code == 2 and "'tpu' is not cpu, cuda or cuda:N" in capsys.readouterr().err


def test_start_up_refuses_a_degree_the_served_variants_heads_cannot_split(tmp_path):
    # demo mode (no checkpoints): the tiny models run, 2 heads -> only degree 2 splits them
    from server.pool import local_workers
    from server.settings import Settings

    settings = Settings(weights_dir=tmp_path, data_dir=tmp_path / "data", devices="cpu,cpu,cpu", sp_degree=3)
    with pytest.raises(ValueError, match=r"degree 3 does not fit kandinsky5-tiny-t2v .* valid degrees: 2$"):
        local_workers(settings)
    ok = local_workers(settings.model_copy(update={"devices": "cpu,cpu", "sp_degree": 2}))
    assert [spec.devices for spec in ok.specs] == [("cpu", "cpu")]


def test_start_up_refuses_fp8_compute_on_a_cpu_worker(tmp_path, monkeypatch, capsys):
    """Refused before any worker starts (the exit status and message of `k5serve serve`)."""
    from server import cli

    monkeypatch.setattr("server.app.use_json_logs", lambda: None)
    code = cli.main(["serve", "--devices", "cpu", "--fp8-compute", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "fp8 compute (--fp8-compute) needs a CUDA GPU with compute capability 8.9" in err
    assert "device is 'cpu'" in err
