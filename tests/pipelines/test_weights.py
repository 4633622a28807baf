"""`k5serve weights list|download|verify`, against a local fake of the Hugging Face hub.

The download tests run the real command (`server.cli.main`, and once the console entry point in
a subprocess) and the real `huggingface_hub.snapshot_download`, over loopback HTTP, against a
server that answers the endpoints huggingface_hub calls: model info
`/api/models/{repo}/revision/{rev}`, the tree listing `/api/models/{repo}/tree/{rev}`, and file
resolution `/{repo}/resolve/{rev}/{path}` (HEAD + GET), where LFS files redirect to a separate
"CDN" origin the way the hub does. Checkpoints are fabricated with safetensors.numpy (no torch).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipelines import weights
from pipelines.variants import VARIANTS
from server.cli import main as cli

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "kandinsky5-lite-t2v-distilled-5s"
REPO = VARIANTS[NAME].repo_id
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".bin", ".png", ".mp4")

# What the pipeline needs from a repo laid out like the real *-Diffusers ones.
NEEDED = {
    "model_index.json",
    "transformer/config.json",
    "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
    "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
    "transformer/diffusion_pytorch_model.safetensors.index.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/generation_config.json",
    "text_encoder/model-00001-of-00002.safetensors",
    "text_encoder/model-00002-of-00002.safetensors",
    "text_encoder/model.safetensors.index.json",
    "text_encoder_2/config.json",
    "text_encoder_2/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/chat_template.jinja",
    "tokenizer/preprocessor_config.json",
    "tokenizer/video_preprocessor_config.json",
    "tokenizer_2/tokenizer.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/special_tokens_map.json",
    "scheduler/scheduler_config.json",
}
JUNK = {
    "README.md",
    ".gitattributes",
    "assets/preview.png",
    "samples/fox.mp4",
    "kandinsky5lite_t2v_distil_5s.safetensors",  # original-format checkpoint at the repo root
    "transformer/diffusion_pytorch_model.bin",
    "vae/README.md",
    "transformer/.ipynb_checkpoints/config-checkpoint.json",
}


# ---------------------------------------------------------------------------------------------
# fabricated checkpoints


def _tensors(seed: int, n: int, width: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"blocks.{i}.weight": rng.standard_normal((width, 16)).astype(np.float32) for i in range(n)}


def _sharded(folder: Path, stem: str, seed: int) -> None:
    """Two shards + the index file, as save_pretrained writes them for large models."""
    weight_map = {}
    for k in (1, 2):
        shard = f"{stem}-{k:05d}-of-00002.safetensors"
        tensors = {f"shard{k}.{t}": v for t, v in _tensors(seed + k, 3, 512).items()}
        save_file(tensors, str(folder / shard))
        weight_map |= dict.fromkeys(tensors, shard)
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / f"{stem}.safetensors.index.json").write_text(json.dumps(index))


def make_checkpoint(root: Path, junk: bool = True) -> Path:
    """A small folder in the layout of kandinskylab/Kandinsky-5.0-*-Diffusers."""
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    index = {
        "_class_name": "Kandinsky5T2VPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "text_encoder_2": ["transformers", "CLIPTextModel"],
        # the real repos' processor class, which needs torchvision: kept as downloaded
        "tokenizer": ["transformers", "Qwen2VLProcessor"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "transformer": ["diffusers", "Kandinsky5Transformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
    }
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        (root / sub / "config.json").write_text(json.dumps({"_class_name": sub, "hidden_size": 16}))
    (root / "text_encoder/generation_config.json").write_text("{}")
    _sharded(root / "transformer", "diffusion_pytorch_model", seed=10)
    _sharded(root / "text_encoder", "model", seed=20)
    save_file(_tensors(30, 4, 64), str(root / "vae/diffusion_pytorch_model.safetensors"))
    save_file(_tensors(40, 4, 64), str(root / "text_encoder_2/model.safetensors"))
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "preprocessor_config.json"):
        (root / "tokenizer" / name).write_text(json.dumps({"name": name}))
    (root / "tokenizer/video_preprocessor_config.json").write_text("{}")
    (root / "tokenizer/merges.txt").write_text("#version: 0.2\nh e\n")
    (root / "tokenizer/chat_template.jinja").write_text("{{ messages }}")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (root / "tokenizer_2" / name).write_text(json.dumps({"name": name}))
    (root / "scheduler/scheduler_config.json").write_text(json.dumps({"shift": 5.0}))
    if junk:
        for rel in JUNK:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(b"junk " * 100)
    return root


def files_under(folder: Path) -> set[str]:
    """Checkpoint files, without huggingface_hub's resume metadata under .cache/ and the content ids
    verify records under .k5serve/ (pipelines/content.py)."""
    return {
        p.relative_to(folder).as_posix()
        for p in folder.rglob("*")
        if p.is_file() and not {".cache", ".k5serve"} & set(p.relative_to(folder).parts)
    }


# ---------------------------------------------------------------------------------------------
# fake hub


@dataclass
class Seen:
    method: str
    path: str
    server: str  # "hub" or "cdn"
    authorization: str | None
    range: str | None


@dataclass
class FakeHub:
    """Serves {repo_id: folder} like the hub; records every request; can fail on purpose."""

    repos: dict[str, Path]
    seen: list[Seen] = field(default_factory=list)
    forbid: set[str] = field(default_factory=set)  # repo paths whose download answers 403
    drop_once: set[str] = field(default_factory=set)  # repo paths whose first download breaks midway
    url: str = ""
    cdn_url: str = ""

    def entry(self, repo: str, rel: str) -> dict:
        data = (self.repos[repo] / rel).read_bytes()
        git_oid = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        info = {"type": "file", "path": rel, "size": len(data), "oid": git_oid}
        if rel.endswith(LFS_SUFFIXES):
            info["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return info

    def repo_calls(self, server: str = "hub") -> list[Seen]:
        """Requests about the repo (model info, tree, resolve; or CDN fetches)."""
        if server == "cdn":
            return [s for s in self.seen if s.server == "cdn"]
        return [s for s in self.seen if s.server == "hub" and ("/api/models/" in s.path or "/resolve/" in s.path)]

    def downloads(self, since: int = 0) -> list[str]:
        """Repo paths whose bytes were sent (GET on the hub or on the CDN), in order."""
        out = []
        for s in self.seen[since:]:
            if s.method != "GET":
                continue
            if s.server == "cdn":
                out.append(s.path.split("/", 2)[2])  # /<sha256>/<repo path>
            elif "/resolve/" in s.path:
                out.append(s.path.split("/", 5)[5])  # /<owner>/<name>/resolve/<rev>/<repo path>
        return out


def _handler(hub: FakeHub, server: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self.handle_any(body=False)

        def do_GET(self):
            self.handle_any(body=True)

        def reply(self, status: int, headers: dict, payload: bytes = b"", body: bool = True) -> None:
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            if "Content-Length" not in headers:
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if body and payload:
                self.wfile.write(payload)

        def json(self, obj) -> None:
            self.reply(200, {"Content-Type": "application/json"}, json.dumps(obj).encode())

        def error(self, status: int, code: str) -> None:
            self.reply(status, {"X-Error-Code": code, "X-Error-Message": code, "X-Repo-Commit": COMMIT})

        def handle_any(self, body: bool) -> None:
            path = urlsplit(self.path).path
            hub.seen.append(
                Seen(self.command, path, server, self.headers.get("Authorization"), self.headers.get("Range"))
            )
            if server == "cdn":
                return self.serve_cdn(path, body)
            parts = path.strip("/").split("/")
            if parts[:2] == ["api", "models"] and len(parts) >= 6:
                repo = "/".join(parts[2:4])
                if repo not in hub.repos:
                    return self.error(404, "RepoNotFound")
                files = sorted(files_under(hub.repos[repo]))
                if parts[4] == "revision":
                    return self.json({"id": repo, "sha": COMMIT, "private": False, "siblings": []})
                if parts[4] == "tree":
                    return self.json([hub.entry(repo, rel) for rel in files])
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rel = "/".join(parts[:2]), "/".join(parts[4:])
                if repo not in hub.repos:
                    return self.error(404, "RepoNotFound")
                if not (hub.repos[repo] / rel).is_file():
                    return self.error(404, "EntryNotFound")
                return self.serve_resolve(repo, rel, body)
            return self.error(404, "RepoNotFound")

        def serve_resolve(self, repo: str, rel: str, body: bool) -> None:
            info = hub.entry(repo, rel)
            if "lfs" in info:  # the hub redirects LFS files to a signed CDN url on another host
                sha = info["lfs"]["oid"]
                return self.reply(
                    302,
                    {
                        "Location": f"{hub.cdn_url}/{sha}/{rel}",
                        "X-Repo-Commit": COMMIT,
                        "ETag": f'"{info["oid"]}"',
                        "X-Linked-Etag": f'"{sha}"',
                        "X-Linked-Size": str(info["size"]),
                    },
                    body=body,
                )
            data = (hub.repos[repo] / rel).read_bytes()
            if body and rel in hub.forbid:
                return self.error(403, "Forbidden")
            headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{info["oid"]}"', "Accept-Ranges": "bytes"}
            self.reply(200, headers | {"Content-Length": str(len(data))}, data, body)

        def serve_cdn(self, path: str, body: bool) -> None:
            _, sha, rel = path.split("/", 2)
            folder = next(iter(hub.repos.values()))
            data = (folder / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == sha
            if body and rel in hub.forbid:
                return self.reply(403, {}, b"AccessDenied")
            start, status = 0, 200
            rng = self.headers.get("Range")
            if rng:
                start, status = int(rng.removeprefix("bytes=").split("-")[0]), 206
            headers = {"Content-Length": str(len(data) - start), "Accept-Ranges": "bytes", "ETag": f'"{sha}"'}
            if status == 206:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            if body and rel in hub.drop_once:  # send half the promised bytes, then hang up
                hub.drop_once.discard(rel)
                self.reply(status, headers, data[start : len(data) // 2])
                self.close_connection = True
                return
            self.reply(status, headers, data[start:], body)

    return Handler


@pytest.fixture
def hub(tmp_path_factory, monkeypatch):
    import huggingface_hub.constants as hf_constants

    source = make_checkpoint(tmp_path_factory.mktemp("served"))
    fake = FakeHub({REPO: source})
    servers = []
    for role in ("hub", "cdn"):
        srv = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake, role))
        srv.daemon_threads = True
        threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(srv)
    fake.url = f"http://127.0.0.1:{servers[0].server_address[1]}"
    fake.cdn_url = f"http://127.0.0.1:{servers[1].server_address[1]}"
    # Only loopback, and nothing of the user's own hub cache or login.
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    # pipelines/loader.py sets HF_HUB_OFFLINE=1 when imported (serving never downloads); the
    # download command runs in its own process where it is not, so undo it here.
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    hf_home = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(hf_home / "token"))
    # huggingface_hub read HF_ENDPOINT at import: set what it derived, as a fresh process with
    # HF_ENDPOINT would have it, so its side requests (e.g. the agent-harness registry it fetches
    # when building headers) hit the fake too.
    monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url)
    template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
    monkeypatch.setattr(hf_constants, "AGENT_HARNESSES_PATH", str(hf_home / "agent_harnesses.json"))
    # And a safety net: any lookup of a host other than loopback fails the test.
    outside: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            outside.append(str(host))
            raise OSError(f"test: network outside loopback blocked ({host})")
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
    yield fake
    assert outside == [], f"tried to reach {outside}"
    for srv in servers:
        srv.shutdown()
        srv.server_close()


def download(weights_dir: Path, *extra: str) -> int:
    return cli(["weights", "download", NAME, "--weights-dir", str(weights_dir), *extra])


# ---------------------------------------------------------------------------------------------
# download


def test_download_fetches_exactly_the_pipeline_files(hub, tmp_path, capsys):
    assert download(tmp_path) == 0
    dest = tmp_path / NAME
    assert files_under(dest) == NEEDED  # junk in the repo (READMEs, images, .bin, originals) skipped
    for rel in NEEDED:
        assert (dest / rel).read_bytes() == (hub.repos[REPO] / rel).read_bytes(), rel
    assert sorted(hub.downloads()) == sorted(NEEDED)
    # left as downloaded: the loader deals with the processor class
    assert json.loads((dest / "model_index.json").read_text())["tokenizer"][1] == "Qwen2VLProcessor"
    out = capsys.readouterr().out
    assert f"from {hub.url}" in out
    assert f"{NAME}: complete" in out


def test_hf_token_goes_to_the_hub_as_bearer_and_not_to_the_cdn(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret_token")
    assert download(tmp_path) == 0
    on_hub, on_cdn = hub.repo_calls("hub"), hub.repo_calls("cdn")
    assert on_hub and on_cdn
    assert {s.authorization for s in on_hub} == {"Bearer hf_secret_token"}
    assert {s.authorization for s in on_cdn} == {None}  # signed CDN urls never get the token


def test_no_token_sends_no_authorization(hub, tmp_path):
    assert download(tmp_path) == 0
    assert {s.authorization for s in hub.seen} == {None}


def test_a_failed_download_resumes_without_fetching_again(hub, tmp_path, capsys):
    shard = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    hub.forbid.add(shard)
    assert download(tmp_path) == 1
    err = capsys.readouterr().err
    assert "again to resume" in err
    done = files_under(tmp_path / NAME)
    assert shard not in done and done < NEEDED

    hub.forbid.clear()
    mark = len(hub.seen)
    assert download(tmp_path) == 0
    # only what was missing travels again; the files already complete are not fetched
    assert sorted(hub.downloads(since=mark)) == sorted(NEEDED - done)
    assert files_under(tmp_path / NAME) == NEEDED


def test_a_transfer_cut_midway_resumes_with_a_range_request(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants as hf_constants

    # huggingface_hub writes in 10 MB chunks: with small files, write smaller ones so the bytes
    # received before the cut are kept and the retry asks for the rest only.
    monkeypatch.setattr(hf_constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    shard = "text_encoder/model-00001-of-00002.safetensors"
    hub.drop_once.add(shard)
    assert download(tmp_path) == 0
    ranged = [s for s in hub.seen if s.range and shard in s.path]
    assert ranged and ranged[0].range.startswith("bytes=")
    assert int(ranged[0].range.removeprefix("bytes=").split("-")[0]) > 0
    assert (tmp_path / NAME / shard).read_bytes() == (hub.repos[REPO] / shard).read_bytes()


def test_download_again_repairs_a_damaged_file(hub, tmp_path, capsys):
    assert download(tmp_path) == 0
    shard = tmp_path / NAME / "text_encoder/model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    assert cli(["weights", "verify", NAME, "--weights-dir", str(tmp_path)]) == 1
    mark = len(hub.seen)
    assert download(tmp_path) == 0
    assert hub.downloads(since=mark) == ["text_encoder/model-00002-of-00002.safetensors"]
    assert "re-fetching 1 damaged file(s)" in capsys.readouterr().out


def test_download_of_a_repo_the_hub_does_not_have(hub, tmp_path, capsys):
    hub.repos.clear()
    assert download(tmp_path) == 1
    err = capsys.readouterr().err
    assert REPO in err and "not found" in err


def test_download_refuses_clearly_in_offline_mode(hub, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert download(tmp_path) == 1
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err
    assert hub.repo_calls() == []


def test_download_through_the_console_entry_point(hub, tmp_path):
    """The real process: env vars only (HF_ENDPOINT, HF_TOKEN, HF_HOME), nothing patched."""
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower() and "OFFLINE" not in k}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_from_env", "HF_HOME": str(tmp_path / "hf_home")}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "weights", "download", NAME, "--weights-dir", str(tmp_path / "w")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert files_under(tmp_path / "w" / NAME) == NEEDED
    assert {s.authorization for s in hub.repo_calls()} == {"Bearer hf_from_env"}


def test_unknown_names_and_demo_variants_are_usage_errors(tmp_path, capsys):
    assert cli(["weights", "download", "kandinsky5-ultra", "--weights-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'kandinsky5-ultra'" in err
    assert NAME in err and "kandinsky5-pro-i2v-sft-5s" in err
    assert cli(["weights", "download", "kandinsky5-tiny-t2v", "--weights-dir", str(tmp_path)]) == 2
    assert "built locally" in capsys.readouterr().err
    assert cli(["weights", "verify", "nope", "--weights-dir", str(tmp_path)]) == 2


def test_allow_patterns_cover_components_and_skip_junk():
    assert all(weights.wanted(rel) for rel in NEEDED)
    assert not any(weights.wanted(rel) for rel in JUNK)


# ---------------------------------------------------------------------------------------------
# verify


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    return make_checkpoint(tmp_path / NAME, junk=False)


def verify(folder: Path) -> int:
    return cli(["weights", "verify", folder.name, "--weights-dir", str(folder.parent)])


def test_verify_passes_on_a_complete_checkpoint(checkpoint, capsys):
    assert verify(checkpoint) == 0
    out = capsys.readouterr().out
    assert "transformer/diffusion_pytorch_model-00001-of-00002.safetensors: 3 tensors" in out
    assert "PROBLEM" not in out


def test_verify_names_a_truncated_safetensors_file(checkpoint, capsys):
    path = checkpoint / "vae/diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:-1])
    assert verify(checkpoint) == 1
    out = capsys.readouterr().out
    assert "PROBLEM  vae/diffusion_pytorch_model.safetensors: truncated" in out


def test_verify_names_a_file_cut_inside_its_header(checkpoint, capsys):
    path = checkpoint / "text_encoder_2/model.safetensors"
    path.write_bytes(path.read_bytes()[:20])
    assert verify(checkpoint) == 1
    assert "text_encoder_2/model.safetensors: header length" in capsys.readouterr().out


def test_verify_names_a_missing_component(checkpoint, capsys):
    for f in (checkpoint / "vae").iterdir():
        f.unlink()
    (checkpoint / "vae").rmdir()
    assert verify(checkpoint) == 1
    out = capsys.readouterr().out
    assert "missing: vae/config.json" in out
    assert "missing: vae/diffusion_pytorch_model*.safetensors" in out


def test_verify_names_a_broken_config(checkpoint, capsys):
    (checkpoint / "transformer/config.json").write_text('{"model_dim": 1792,')
    assert verify(checkpoint) == 1
    assert "PROBLEM  transformer/config.json: not valid JSON" in capsys.readouterr().out


def test_verify_names_a_shard_the_index_points_to_but_is_gone(checkpoint, capsys):
    (checkpoint / "text_encoder/model-00002-of-00002.safetensors").unlink()
    assert verify(checkpoint) == 1
    out = capsys.readouterr().out
    assert "text_encoder/model.safetensors.index.json: shard model-00002-of-00002.safetensors is missing" in out


def test_verify_names_tensors_the_index_expects_but_the_shard_lacks(checkpoint, capsys):
    index = checkpoint / "transformer/diffusion_pytorch_model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["extra.weight"] = "diffusion_pytorch_model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert verify(checkpoint) == 1
    assert "lacks 1 tensors, e.g. 'extra.weight'" in capsys.readouterr().out


def test_verify_of_a_variant_not_present(tmp_path, capsys):
    assert cli(["weights", "verify", NAME, "--weights-dir", str(tmp_path)]) == 1
    assert f"k5serve weights download {NAME}" in capsys.readouterr().out


def test_safetensors_header_checks(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"a": np.zeros((2, 3), np.float16)}, str(path))
    assert weights.read_safetensors_header(path)["a"]["shape"] == [2, 3]
    path.write_bytes(path.read_bytes() + b"\0")
    with pytest.raises(weights.CheckpointError, match="trailing bytes"):
        weights.read_safetensors_header(path)
    header = json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(weights.CheckpointError, match="needs 16 bytes"):
        weights.read_safetensors_header(path)
    path.write_bytes(b"\x05")
    with pytest.raises(weights.CheckpointError, match="too short"):
        weights.read_safetensors_header(path)


def test_verify_accepts_what_the_tiny_builder_writes(tiny_weights_dir, capsys):
    """The same checks pass on the diffusers output of pipelines/tiny.py (conftest builds it)."""
    for name in ("kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"):
        assert cli(["weights", "verify", name, "--weights-dir", str(tiny_weights_dir)]) == 0
        out = capsys.readouterr().out
        assert "transformer/diffusion_pytorch_model.safetensors:" in out and "PROBLEM" not in out


# ---------------------------------------------------------------------------------------------
# --from (air-gapped import)


def test_import_from_a_folder_copied_by_hand(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "usb" / "Kandinsky-5.0-T2V-Lite-distilled16steps-5s-Diffusers")
    wd = tmp_path / "weights"
    assert download(wd, "--from", str(source)) == 0
    dest = wd / NAME
    assert files_under(dest) == NEEDED  # junk not imported
    shard = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
    assert (dest / shard).stat().st_ino == (source / shard).stat().st_ino  # same filesystem: hardlinked
    out = capsys.readouterr().out
    assert f"{len(NEEDED)} hardlinked, 0 copied" in out and f"{NAME}: complete" in out

    assert download(wd, "--from", str(source)) == 0  # again: nothing to do
    assert f"0 hardlinked, 0 copied, {len(NEEDED)} already there" in capsys.readouterr().out


def test_import_copies_across_filesystems(tmp_path, monkeypatch, capsys):
    def no_links(*_):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    source = make_checkpoint(tmp_path / "usb", junk=False)
    assert download(tmp_path / "weights", "--from", str(source)) == 0
    assert f"0 hardlinked, {len(NEEDED)} copied" in capsys.readouterr().out


def test_import_of_an_incomplete_folder_fails_naming_what_is_missing(tmp_path, capsys):
    source = make_checkpoint(tmp_path / "usb", junk=False)
    (source / "scheduler/scheduler_config.json").unlink()
    assert download(tmp_path / "weights", "--from", str(source)) == 1
    assert "missing: scheduler/scheduler_config.json" in capsys.readouterr().out


def test_import_from_a_path_that_is_not_a_folder(tmp_path, capsys):
    assert download(tmp_path / "weights", "--from", str(tmp_path / "nowhere")) == 2
    assert "not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert download(tmp_path / "weights", "--from", str(tmp_path / "empty")) == 1
    assert "holds none of the checkpoint files" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# list


def test_list_shows_presence_sizes_public_ids_and_repos(tmp_path, capsys):
    make_checkpoint(tmp_path / NAME, junk=False)
    partial = make_checkpoint(tmp_path / "kandinsky5-pro-t2v-sft-5s", junk=False)
    (partial / "vae/diffusion_pytorch_model.safetensors").unlink()
    assert cli(["weights", "list", "--weights-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row = {line.split()[0]: line for line in lines if line.startswith("kandinsky5-")}
    assert set(row) == set(VARIANTS)

    size = weights.human_size(weights.folder_size(tmp_path / NAME))
    assert " present " in row[NAME] and f" {size} " in row[NAME]
    assert REPO in row[NAME] and "fal-ai/kandinsky5/text-to-video/distill" in row[NAME]
    served = lines[lines.index(row[NAME]) + 1]
    assert served.strip() == "sber-ai/kandinsky5-distill-t2v"  # one public id per line

    assert "incomplete (1 missing)" in row["kandinsky5-pro-t2v-sft-5s"]
    assert "fal-ai/kandinsky5-pro/text-to-video" in row["kandinsky5-pro-t2v-sft-5s"]
    absent = row["kandinsky5-lite-t2v-sft-10s"].split()
    assert absent[1:3] == ["absent", "-"]
    assert "(built locally)" in row["kandinsky5-tiny-t2v"] and "not built" in row["kandinsky5-tiny-t2v"]
