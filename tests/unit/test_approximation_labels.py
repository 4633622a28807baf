"""Opt-in approximate weights (pipelines/quant.py) are labelled in the job's log and record, as
MagCache is: fal's logs and /api/jobs read both. Torch-free (the server side only)."""

from __future__ import annotations

from pipelines.request import GenerationRequest
from server.jobs import Job, JobOutput

LABEL = "transformer fp8 e4m3 weights (per-row scales)"  # pipelines.quant.TRANSFORMER_FP8


def _output(**kw) -> JobOutput:
    return JobOutput("v.mp4", "video/mp4", 1, 64, 64, 9, 24, 3, 1, "kandinsky5-tiny-t2v", True, **kw)


def test_the_log_says_approximate_and_the_record_keeps_it():
    job = Job.new(contract="fal", model="m", request=GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a"))
    job.log_how_made(_output(approximations=[LABEL]))
    assert [line.message for line in job.logs] == [f"approximate: {LABEL} (opt-in server setting)"]
    job.start()
    job.succeed(_output(approximations=[LABEL]))
    again = Job.from_dict(job.to_dict())  # what the SQLite store keeps
    assert again.output.approximations == [LABEL]


def test_exact_output_logs_nothing_and_old_records_load():
    job = Job.new(contract="fal", model="m", request=GenerationRequest(variant="kandinsky5-tiny-t2v", prompt="a"))
    job.log_how_made(_output())
    assert job.logs == []
    record = job.to_dict() | {"output": {k: v for k, v in vars(_output()).items() if k != "approximations"}}
    assert Job.from_dict(record).output.approximations == []  # a record from before this field
