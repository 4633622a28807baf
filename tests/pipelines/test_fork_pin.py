"""The denoising fork (pipelines/denoise.py) is pinned to the diffusers code it copies (pipelines/upstream.py).

A diffusers upgrade that changes any watched object fails here, naming the object and the k5serve
code to re-check; the installed diffusers must be inside pyproject.toml's bound. The checker itself
is shown to fail on a changed source, and the fork is compared by value with the installed forward.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from pipelines import upstream
from pipelines.upstream import PINNED_DIFFUSERS, PINS, WATCHED, bound_problem, drift, installed_text, normalise

PYPROJECT = next(d / "pyproject.toml" for d in Path(__file__).resolve().parents if (d / "pyproject.toml").is_file())
FORWARD = "Kandinsky5Transformer3DModel.forward"


def diffusers_requirement() -> str:
    (line,) = re.findall(r'^\s*"(diffusers[^"]*)"', PYPROJECT.read_text(), re.M)
    return line


@pytest.fixture(scope="module")
def texts() -> dict[str, str | None]:
    return {w.qualname: installed_text(w) for w in WATCHED}


# ---- the pin and the bound, against what is installed -------------------------------------------


def test_pinned_upstream_objects_are_unchanged(texts):
    problems = drift(texts)
    assert not problems, "the diffusers code the denoising fork copies changed:\n" + "\n".join(problems)


def test_installed_diffusers_is_inside_the_pyproject_bound():
    requirement = diffusers_requirement()
    assert bound_problem(requirement, version("diffusers")) is None, bound_problem(requirement, version("diffusers"))
    assert bound_problem(requirement, PINNED_DIFFUSERS) is None, f"pinned from {PINNED_DIFFUSERS}, outside the bound"


def test_every_watched_object_has_exactly_one_pin():
    names = [w.qualname for w in WATCHED]
    assert len(names) == len(set(names))
    assert set(PINS) == set(names)


# ---- the checker can fail, and says what to re-check -------------------------------------------


def test_a_changed_source_is_reported_with_its_name_versions_and_mirror(texts):
    changed = texts[FORWARD].replace("time_embed = time_embed +", "time_embed = 2 * time_embed +")
    assert changed != texts[FORWARD]
    (problem,) = drift({**texts, FORWARD: changed}, installed_version="0.43.0")
    assert f"diffusers.models.transformers.transformer_kandinsky.{FORWARD} changed" in problem
    assert f"pinned from diffusers {PINNED_DIFFUSERS}, installed 0.43.0" in problem
    assert "pipelines/denoise.py: transformer_forward" in problem
    assert "python -m pipelines.upstream --update" in problem


def test_a_removed_object_and_a_changed_signature_are_reported(texts):
    gone = "Kandinsky5Modulation.forward"
    params = "dispatch_attention_fn"
    problems = drift({**texts, gone: None, params: texts[params].replace("backend", "attn_backend")})
    assert len(problems) == 2
    assert f"{gone} is gone" in problems[0] and "_per_sample_class" in problems[0]
    assert f"{params} changed its parameters" in problems[1] and "MaskedAttnProcessor" in problems[1]


def test_whitespace_only_changes_are_not_a_change():
    source = "    def forward(self, x):\n        return x\n"
    assert normalise(source) == normalise("\n" + source.replace("x\n", "x   \n") + "\n\n")
    assert normalise(source) != normalise(source.replace("return x", "return -x"))


def test_bound_problems_name_the_bound_and_the_version():
    assert "no upper bound" in bound_problem("diffusers>=0.42.1", "0.42.1")
    outside = bound_problem("diffusers>=0.42.1,<0.43", "0.43.0")
    assert "0.43.0 is outside" in outside and "<0.43" in outside
    assert bound_problem("diffusers>=0.42.1,<0.43", "0.42.2") is None


def test_update_rewrites_the_pins_from_the_installed_diffusers(tmp_path, texts, monkeypatch):
    """`python -m pipelines.upstream --update` on a copy whose pin for the forward is stale."""
    copy = tmp_path / "upstream_copy.py"
    shutil.copy(upstream.__file__, copy)
    stale = copy.read_text().replace(f'"{FORWARD}": "{PINS[FORWARD]}"', f'"{FORWARD}": "0000000000000000"')
    copy.write_text(stale.replace(f'PINNED_DIFFUSERS = "{PINNED_DIFFUSERS}"', 'PINNED_DIFFUSERS = "0.0.1"'))

    def load():
        spec = importlib.util.spec_from_file_location("upstream_copy", copy)
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, "upstream_copy", module)  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module

    (problem,) = load().drift(texts)
    assert f"{FORWARD} changed (pinned from diffusers 0.0.1" in problem
    assert load().main(["--update"]) == 0
    after = load()
    assert after.PINS == PINS
    assert version("diffusers") == after.PINNED_DIFFUSERS
    assert after.drift(texts) == []
    original = Path(upstream.__file__).read_text()  # the rest of the file is left as it was
    pinned_line = f'PINNED_DIFFUSERS = "{PINNED_DIFFUSERS}"'
    assert copy.read_text() == original.replace(pinned_line, f'PINNED_DIFFUSERS = "{version("diffusers")}"')


# ---- by value: the fork computes what the installed diffusers computes ------------------------


@pytest.mark.parametrize("nabla", [False, True], ids=["regular", "nabla"])
def test_fork_forward_equals_the_installed_forward_bit_for_bit(tiny_weights_dir, tiny_nabla_dir, nabla):
    """transformer_forward at batch 1 (the sequential and no-CFG path) against diffusers' own forward
    on an unmodified transformer: a changed upstream forward that the pin missed shows up here."""
    from diffusers import Kandinsky5T2VPipeline

    from pipelines.denoise import transformer_forward
    from pipelines.loader import set_attention_backend

    pipe = Kandinsky5T2VPipeline.from_pretrained(
        tiny_nabla_dir if nabla else tiny_weights_dir / "kandinsky5-tiny-t2v", dtype=torch.float32
    )
    tr = pipe.transformer.eval()
    if nabla:
        set_attention_backend(tr, "flex")  # what nabla needs (its BlockMask); per processor only
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 3, 32, 32, 33, generator=g)
    args = (
        x,
        torch.randn(1, 9, 32, generator=g),
        torch.tensor([640.0]),
        torch.randn(1, 32, generator=g),
        [torch.arange(3), torch.arange(16), torch.arange(16)],
        torch.arange(9),
        (1.0, 2.0, 2.0),
        pipe.get_sparse_params(x, "cpu"),
    )
    assert (args[-1] is not None) == nabla
    with torch.no_grad():
        ours, _ = transformer_forward(tr, *args)
        stock = tr(*args).sample
    assert torch.equal(ours, stock)
