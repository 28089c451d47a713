"""The stage registry, the one loader of `module:name` specs, and the one rerun rule."""

import dataclasses

import pytest

from tether.errors import ConfigError
from tether.models.save import mark_complete
from tether.specs import load_object
from tether.stages import STAGES, config_class
from tether.training.checkpoint import STATE_FILE
from tether.training.rundir import prepare_rerun, skip_or_resume


def test_every_stage_names_a_config_dataclass():
    for name in STAGES:
        assert dataclasses.is_dataclass(config_class(name)), name


def test_a_spec_names_a_file_or_a_module(tmp_path):
    fns = tmp_path / "fns.py"
    fns.write_text("def one():\n    return 1\n")
    assert load_object(f"{fns}:one", "--reward-fn")() == 1
    assert load_object("tether.specs:load_object", "--gold-judge") is load_object


@pytest.mark.parametrize("spec,needle", [
    ("nocolon", "give it as path/to/file.py:function_name or package.module:function_name"),
    ("missing.py:f", "is not a file"),
    ("no_such_module_here:f", "cannot import no_such_module_here"),
    ("tether.specs:absent", "has no function 'absent'"),
    ("tether.specs:FORMS", "has no function 'FORMS'"),  # there, but nothing to call
    ("{tmp}/broken.py:f", "importing .*broken.py raised ZeroDivisionError"),
])
def test_a_bad_spec_is_a_usage_error_naming_it_and_what_it_was_for(spec, needle, tmp_path):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    spec = spec.format(tmp=tmp_path)
    with pytest.raises(ConfigError, match=needle) as err:
        load_object(spec, "--reward-fn")
    assert str(err.value).startswith(f"--reward-fn {spec!r}: ")


def test_a_rerun_skips_a_finished_run_resumes_an_unfinished_one_and_starts_the_rest(tmp_path):
    cfg = config_class("sft")(model="m", data="d.jsonl", output_dir=str(tmp_path / "sft"))
    out = tmp_path / "sft"
    assert skip_or_resume(out) == "start" and prepare_rerun(cfg) == ("start", cfg)
    (out / "checkpoints" / "step-3").mkdir(parents=True)
    assert skip_or_resume(out) == "start"  # a half-written checkpoint is no checkpoint
    (out / "checkpoints" / "step-3" / STATE_FILE).write_text("{}")
    action, resumed = prepare_rerun(cfg)
    assert skip_or_resume(out) == "resume" and action == "resume"
    assert resumed == dataclasses.replace(cfg, resume=True)
    mark_complete(out, "sft", {})
    assert skip_or_resume(out) == "skip" and prepare_rerun(cfg) == ("skip", cfg)
