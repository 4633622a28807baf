"""Where outputs and fetched inputs live under --data-dir, and the /files route that serves them.

    data/jobs.sqlite3               job + webhook records (store.py)
    data/files/<file_id>/output.mp4 one folder per job, named by an unguessable token
    data/inputs/<job_id>.<ext>      images fetched for image-to-video, removed when the job ends

Output URLs are capability URLs (like the clouds' CDN links): anyone holding one can download it,
nobody can guess one, and the route accepts nothing but a well-formed token and file name, so
no path can leave data/files.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

OUTPUT_NAME = "output.mp4"
PART = ".part"  # suffix of a file still being written (the engine renames it when complete)
VIDEO_CONTENT_TYPE = "video/mp4"
_FILE_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class Storage:
    def __init__(self, data_dir: Path):
        self.root = data_dir
        self.files = data_dir / "files"
        self.inputs = data_dir / "inputs"
        self.files.mkdir(parents=True, exist_ok=True)
        self.inputs.mkdir(parents=True, exist_ok=True)

    @property
    def database(self) -> Path:
        return self.root / "jobs.sqlite3"

    def output_path(self, file_id: str, name: str = OUTPUT_NAME) -> Path:
        if not _FILE_ID.match(file_id) or not _FILE_NAME.match(name):
            raise ValueError(f"bad file id/name {file_id!r}/{name!r}")
        folder = self.files / file_id
        folder.mkdir(parents=True, exist_ok=True)
        return folder / name

    def find(self, file_id: str, name: str) -> Path | None:
        """The stored file, or None; anything that is not a plain token/name is simply not found.
        A `*.part` file is a write in progress (or one a crash cut short): never served."""
        if not _FILE_ID.match(file_id) or not _FILE_NAME.match(name) or ".." in name or name.endswith(PART):
            return None
        path = self.files / file_id / name
        try:
            if path.resolve().parent.parent != self.files.resolve() or not path.is_file():
                return None
        except OSError:
            return None
        return path

    def response(self, file_id: str, name: str, **kwargs) -> FileResponse | None:
        """A FileResponse for a stored file, or None if it is not there (any more). The file is
        opened here, so a delete or an expiry racing the download answers 404 before it starts
        or lets it finish; it never cuts a response short (see PinnedFile)."""
        path = self.find(file_id, name)
        if path is None:
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        if _PROC_FD.is_dir():
            return PinnedFile(fd, **kwargs)
        stat = os.fstat(fd)  # no /proc: a delete between here and the read can still interrupt it
        os.close(fd)
        return FileResponse(path, stat_result=stat, **kwargs)

    def has_output(self, file_id: str, name: str = OUTPUT_NAME) -> bool:
        return self.find(file_id, name) is not None

    def input_path(self, job_id: str, suffix: str) -> Path:
        return self.inputs / f"{job_id}{suffix}"

    def remove_inputs(self, job_id: str) -> None:
        for path in self.inputs.glob(f"{job_id}.*"):
            path.unlink(missing_ok=True)

    def discard_output(self, file_id: str) -> None:
        """Remove a job's output folder and everything in it (a failed, cancelled or deleted job)."""
        if _FILE_ID.match(file_id):
            shutil.rmtree(self.files / file_id, ignore_errors=True)

    def sweep(self, keep_outputs: Iterable[str], keep_inputs: Iterable[str]) -> dict[str, int]:
        """Start-up clean-up (nothing else runs yet): output folders of no finished job (a crash cut
        a run or a delete short), `*.part` files (interrupted writes) and inputs of no waiting job."""
        keep_files, keep_jobs = set(keep_outputs), set(keep_inputs)
        removed = {"folders": 0, "partial": 0, "inputs": 0}
        for folder in self.files.iterdir():
            if folder.name not in keep_files:
                if folder.is_dir():
                    shutil.rmtree(folder, ignore_errors=True)
                else:
                    folder.unlink(missing_ok=True)
                removed["folders"] += 1
                continue
            for part in folder.glob(f"*{PART}"):
                part.unlink(missing_ok=True)
                removed["partial"] += 1
        for path in self.inputs.iterdir():
            if path.name.split(".", 1)[0] not in keep_jobs:
                path.unlink(missing_ok=True)
                removed["inputs"] += 1
        return removed


_PROC_FD = Path("/proc/self/fd")


class PinnedFile(FileResponse):
    """Serves a file through a descriptor opened before the response starts (its /proc/self/fd
    link), so unlinking the file meanwhile cannot cut the download short; Range requests work as
    with any FileResponse. The descriptor is closed when the response ends, however it ends."""

    def __init__(self, fd: int, **kwargs):
        self._fd = fd
        super().__init__(_PROC_FD / str(fd), stat_result=os.fstat(fd), **kwargs)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            os.close(self._fd)


def fsync_file(path: Path) -> None:
    """Flush a finished output (and its folder entry) to disk before the job is marked done."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def file_url(base: str, file_id: str, name: str) -> str:
    """The absolute, unguessable URL that files_router serves an output under."""
    return f"{base}/files/{file_id}/{name}"


def files_router(storage: Storage) -> APIRouter:
    router = APIRouter()

    @router.get("/files/{file_id}/{name}", include_in_schema=False)
    async def get_file(file_id: str, name: str) -> FileResponse:
        media_type = VIDEO_CONTENT_TYPE if name.endswith(".mp4") else None
        response = storage.response(
            file_id, name, media_type=media_type, filename=name, content_disposition_type="inline"
        )
        if response is None:
            raise HTTPException(status_code=404, detail="File not found")
        return response

    return router
