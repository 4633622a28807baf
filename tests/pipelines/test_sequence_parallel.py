"""One video across two CPU "devices": a GroupEngine (rank 0 here, rank 1 spawned, gloo over
loopback) on the tiny pipelines must give the single-process frames for the same seed.

Exactness: each rank computes per-token ops on its slice and whole heads after the all-to-all, so the
numbers are those of one process; the frames are compared bit for bit (max diff 0.0), as they are:
- regular attention, tokens split (guidance 1: degree 2);
- nabla sparse attention, tokens split, the mask built after the all-to-all; the tiny nabla config
  here is made sparse (STA window 1, P=0.5) and the CPU runs it as the GPU kernel does
  (pipelines/flex_cpu.py: BlockMask.to_dense() + SDPA), so a mask built from one rank's half would
  show; the test also checks the mask matters (nabla != regular on the same weights);
- CFG parallel (guidance 5: cond on rank 0, uncond on rank 1) against the sequential single-process
  run (each branch evaluated alone, as each rank does).
One group serves the whole module (spawning a rank costs seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest

from pipelines.cancel import CancelToken
from pipelines.engine import Engine
from pipelines.errors import Cancelled, InvalidRequest
from pipelines.group import GroupEngine, build_engine
from pipelines.member import split_for
from pipelines.request import GenerationRequest
from pipelines.variants import ATTENTION_HEADS, NABLA_TRANSFORMER_CONFIG
from pipelines.video import read_mp4
from server.engine_protocol import WorkerLost

T2V, I2V = "kandinsky5-tiny-t2v", "kandinsky5-tiny-i2v"
SPARSE_NABLA = dict(NABLA_TRANSFORMER_CONFIG, attention_P=0.5, attention_wT=1, attention_wH=1, attention_wW=1)


@pytest.fixture(scope="module")
def weights(tiny_weights_dir, tmp_path_factory):
    """tiny-i2v as built (regular attention), tiny-t2v with a sparse nabla config."""
    folder = tmp_path_factory.mktemp("sp-weights")
    for name in (T2V, I2V):
        shutil.copytree(tiny_weights_dir / name, folder / name)
    config_path = folder / T2V / "transformer" / "config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **SPARSE_NABLA}))
    return folder


@pytest.fixture(scope="module")
def group(weights):
    engine = build_engine(["cpu", "cpu"], weights_dir=weights)
    assert isinstance(engine, GroupEngine)
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def single(weights):
    return Engine(weights, device="cpu", cfg_batch=False)  # each CFG branch alone, as a CFG-parallel rank


def nabla(**kw) -> GenerationRequest:
    args = dict(variant=T2V, prompt="a red fox", width=256, height=128, num_frames=9, steps=2, seed=5, guidance=1.0)
    return GenerationRequest(**{**args, **kw})


def i2v(image, **kw) -> GenerationRequest:
    args = dict(variant=I2V, prompt="a red fox", image=str(image), width=64, height=64, num_frames=17, steps=2)
    return GenerationRequest(**{**args, "seed": 5, "guidance": 1.0, **kw})


def tokens_seen_by_rank0(group, variant):
    seen = []
    block = group.engine.pipeline(variant).transformer.visual_transformer_blocks[0]
    return seen, block.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[1]))


def test_regular_attention_split_across_two_ranks_equals_one_process(group, single, test_image):
    r = group.prepare(i2v(test_image))
    group.generate_frames(r)  # starts the ranks and loads
    seen, hook = tokens_seen_by_rank0(group, I2V)
    try:
        split = group.generate_frames(r).frames
    finally:
        hook.remove()
    alone = single.generate_frames(single.prepare(i2v(test_image))).frames
    assert seen and set(seen) == {5 * 4 * 4 // 2}  # 5 latent frames x 4 x 4 patches, half each
    heads = group.engine.pipeline(I2V).transformer.visual_transformer_blocks[0].self_attention.num_heads
    assert heads == ATTENTION_HEADS["tiny"]  # what valid_sp_degrees reads, torch-free
    assert np.array_equal(split, alone)


def test_nabla_split_across_two_ranks_equals_one_process(group, single, tiny_weights_dir):
    split = group.generate_frames(group.prepare(nabla())).frames
    alone = single.generate_frames(single.prepare(nabla())).frames
    assert np.array_equal(split, alone)
    regular = Engine(tiny_weights_dir, device="cpu")  # the same weights with full attention
    full = regular.generate_frames(regular.prepare(nabla())).frames
    assert np.abs(full - alone).max() > 1e-3  # the sparse mask changed the result: it was applied


def test_cfg_parallel_equals_the_sequential_single_process_run(group, single, test_image):
    r = group.prepare(i2v(test_image, guidance=5.0))
    split = group.generate_frames(r).frames
    alone = single.generate_frames(single.prepare(i2v(test_image, guidance=5.0))).frames
    assert np.array_equal(split, alone)


def test_progress_from_rank0_and_a_cancel_stops_every_rank_at_the_same_step(group, test_image, tmp_path):
    token, seen = CancelToken(), []

    def on_step(i, n):
        seen.append((i, n))
        token.cancel()

    with pytest.raises(Cancelled):
        group.generate(group.prepare(i2v(test_image, steps=3)), tmp_path / "x.mp4", on_step=on_step, cancel=token)
    assert seen == [(1, 3)] and not (tmp_path / "x.mp4").exists()
    # still in step: the next job runs, and writes its file
    phases = []
    result = group.generate(group.prepare(i2v(test_image)), tmp_path / "y.mp4", on_phase=lambda *p: phases.append(p))
    assert read_mp4(result.path)[0].shape[0] == 17 and phases[-1] == ("writing", 0, 1)
    assert phases[0] == ("loading", 0, 1) and ("encoding", 0, 1) in phases  # before the group loads its ranks


def test_a_clip_made_in_passes_is_refused_on_a_group_not_run_on_rank0_alone(group):
    # Engine.generate runs the passes of a long clip itself; on a group only rank 0 would, and the
    # other ranks would wait at the first pass's collectives (found merging issue 15's extensions)
    with pytest.raises(InvalidRequest, match="does not run on a sequence-parallel group"):
        group.prepare(nabla(variant=T2V, width=64, height=64, num_frames=41))  # tiny: 25 frames a pass


def test_a_degree_that_does_not_divide_the_heads_is_refused_naming_the_valid_ones(weights):
    with pytest.raises(ValueError, match=r"degree 3 .* valid degrees: 2$"):
        build_engine(["cpu", "cpu", "cpu"], weights_dir=weights)


def test_a_rank_that_dies_mid_run_is_an_exception_not_a_hang(group, test_image, tmp_path):
    """Last in the module: it tears the group down; the next job starts a fresh one."""
    group.warmup()  # started (a no-op start when earlier tests started it), the tiny models loaded on both
    pid = group._ranks[0][0].pid

    def kill_rank1(i, n):
        if i == 1:
            os.kill(pid, signal.SIGKILL)

    with pytest.raises(WorkerLost, match="rank 1"):
        group.generate_frames(group.prepare(i2v(test_image, steps=3)), on_step=kill_rank1)
    assert group.member is None and not group._ranks
    again = group.generate_frames(group.prepare(i2v(test_image)))  # a fresh rank 1, a new process group
    assert again.frames.shape == (17, 64, 64, 3) and group._ranks[0][0].pid != pid


@pytest.mark.parametrize(
    ("size", "guidance", "cfg_parallel", "expected"),
    [
        (2, 1.0, True, [(None, 0, 2), (None, 1, 2)]),  # no CFG: tokens split 2 ways
        (2, 5.0, True, [(0, 0, 1), (1, 0, 1)]),  # pure CFG parallel
        (2, 5.0, False, [(None, 0, 2), (None, 1, 2)]),  # CFG batched on both, tokens split
        (4, 5.0, True, [(0, 0, 2), (0, 1, 2), (1, 0, 2), (1, 1, 2)]),  # CFG 2 x sequence 2
        (8, 1.0, True, [(None, r, 8) for r in range(8)]),
        (7, 5.0, True, [(None, r, 7) for r in range(7)]),  # odd: no halves, CFG batched
    ],
)
def test_the_layout_of_a_request_on_a_group(size, guidance, cfg_parallel, expected):
    assert [split_for(rank, size, guidance, cfg_parallel) for rank in range(size)] == expected
