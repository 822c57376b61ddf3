from __future__ import annotations

from pathlib import Path

import pytest

from likeness.errors import InvalidInput
from likeness.generate.plan import cell_prompts, plan_gallery
from likeness.spec import load_spec, spec_from_dict

# Not `from conftest import REPO`: tests/curate/conftest.py is also a module named conftest, and
# whichever pytest imported last wins that name.
REPO = Path(__file__).resolve().parent.parent


def test_example_spec_loads_with_workflow_defaults():
    spec = load_spec(REPO / "examples" / "emily.toml")
    assert spec.token == "3m1ly"
    assert spec.sampling.sampler == "DPM++ 2M Karras"
    assert (spec.sampling.steps, spec.sampling.cfg_scale, spec.sampling.width) == (30, 7.0, 512)
    assert spec.grid_size == 400


@pytest.mark.parametrize(
    "patch, field",
    [
        ({"token": "two words"}, "token"),
        ({"sampling": {"sampler": "Euler b"}}, "sampling.sampler"),
        ({"sampling": {"width": 500}}, "sampling.width"),
        ({"per_cell": 0}, "per_cell"),
        ({"colour": "red"}, "colour"),
        ({"template": "photo {nope}"}, "template"),
        ({"template": "photo, {zoom}"}, "template"),
        # Format specs and conversions only fail when the prompt is built: caught up front.
        ({"template": "photo {traits:d}"}, "template"),
        ({"template": "photo {traits!z}"}, "template"),
        ({"zooms": []}, "zooms"),
        ({"sampling": {"steps": "30"}}, "sampling.steps"),
        # Syntax A1111 would act on and Likeness would only encode as characters: refused at load.
        ({"template": "photo of {traits} AND a cat, {zoom}, {angle}"}, "template"),
        ({"template": "photo <lora:face:0.8> of {traits}, {zoom}, {angle}"}, "template"),
        ({"wardrobe": "red coat <hypernet:cloth:1>"}, "template"),
        ({"negative_prompt": "blurry, <lora:bad:1>"}, "negative_prompt"),
        ({"angles": ["front shot", "side AND back"]}, "angles"),
        ({"sampling": {"rng": "quantum"}}, "sampling.rng"),
    ],
    ids=["token-two-words", "unknown-sampler", "width-not-multiple-of-8", "per-cell-zero", "unknown-field",
         "unknown-placeholder", "no-prompt-sr-value", "format-spec", "conversion", "no-zooms", "steps-as-text",
         "template-AND", "template-lora", "wardrobe-hypernet", "negative-lora", "angle-AND", "unknown-rng"],
)
def test_invalid_specs_name_the_field(patch, field):
    data = {"name": "E", "token": "3m1ly", **patch}
    with pytest.raises(InvalidInput) as exc:
        spec_from_dict(data)
    assert f"spec.{field}" in str(exc.value)


def test_prompt_syntax_that_works_still_loads():
    # Lower-case "and", prompt editing, alternation, ComfyUI's embedding:name and AND in a negative
    # prompt (A1111 reads AND only in prompts) are all fine.
    spec = spec_from_dict({"name": "E", "token": "3m1ly", "negative_prompt": "cats AND dogs, embedding:bad-hands",
                           "template": "photo of {traits} and [a cat:a dog:0.5], [red|blue] coat, {zoom}, {angle}"})
    assert "[a cat:a dog:0.5]" in cell_prompts(spec, 0, 0)[0]


def test_grid_counts_and_seeds():
    spec = spec_from_dict({"name": "E", "token": "3m1ly"})
    plan = plan_gallery(spec, base_seed=1000)
    assert len(plan) == 400 == 5 * 5 * 16
    assert len({p.id for p in plan}) == 400
    assert [p.seed for p in plan] == list(range(1000, 1400))
    assert {(p.zoom, p.angle) for p in plan} == {(z, a) for z in spec.zooms for a in spec.angles}
    random_plan = plan_gallery(spec)  # seed -1: drawn once, then consecutive
    assert all(0 <= p.seed < 2**32 for p in random_plan)
    assert random_plan[1].seed == random_plan[0].seed + 1


def test_prompt_sr_replaces_every_occurrence_in_prompt_and_negative():
    spec = spec_from_dict({
        "name": "E", "token": "3m1ly",
        "template": "closeup photo, front shot, closeup detail",
        "negative_prompt": "bad closeup",
        "zooms": ["closeup", "full body"], "angles": ["front shot", "side angle"],
    })
    prompt, negative = cell_prompts(spec, 1, 1)
    assert prompt == "full body photo, side angle, full body detail"
    assert negative == "bad full body"
    assert cell_prompts(spec, 0, 0)[0] == "closeup photo, front shot, closeup detail"


def test_prompt_sr_first_value_must_occur():
    with pytest.raises(InvalidInput, match="first value 'far away'"):
        spec_from_dict({"name": "E", "token": "3m1ly", "template": "photo, front shot",
                        "zooms": ["far away", "near"], "angles": ["front shot"]})


def test_a_folder_given_as_spec_is_named_a_folder(tmp_path) -> None:
    # Said "spec file examples does not exist" for a folder that plainly exists.
    with pytest.raises(InvalidInput, match="is a folder"):
        load_spec(tmp_path)
    with pytest.raises(InvalidInput, match="does not exist"):
        load_spec(tmp_path / "nope.toml")


def test_spec_check_refuses_a_token_the_tokenizer_already_knows(tiny_models, tmp_path, capsys):
    from likeness.cli.main import main

    spec = tmp_path / "w.toml"
    spec.write_text('name = "W"\ntoken = "woman"\n')
    assert main(["spec", "check", str(spec)]) == 2
    assert "already a single token" in capsys.readouterr().err
    assert main(["spec", "check", str(REPO / "examples" / "emily.toml")]) == 0
    out = __import__("json").loads(capsys.readouterr().out)
    assert out["ok"] and len(out["token"]["pieces_before_training"]) > 1


def test_cli_turns_os_errors_into_messages(tmp_path, capsys, monkeypatch):
    from likeness.cli import main as cli

    def boom(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "x"))

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["profiles"].set_defaults(func=boom)
    assert cli.main(["profiles"]) == 1
    assert "error: Permission denied" in capsys.readouterr().err


def test_a_latin1_spec_says_it_must_be_utf8(tmp_path) -> None:
    # Was a UnicodeDecodeError traceback.
    path = tmp_path / "zoe.toml"
    path.write_bytes('name = "Zoé"\ntoken = "z03"\n'.encode("latin-1"))
    with pytest.raises(InvalidInput, match="must be UTF-8") as exc:
        load_spec(path)
    assert "0xe9" in str(exc.value) and "zoe.toml" in str(exc.value)
    path.write_bytes('name = "Zoé"\ntoken = "z03"\n'.encode("utf-8"))
    assert load_spec(path).name == "Zoé"


def test_cli_spec_check_of_a_latin1_file_is_an_error_not_a_traceback(tmp_path, capsys) -> None:
    from likeness.cli.main import main

    path = tmp_path / "zoe.toml"
    path.write_bytes('name = "Zoé"\ntoken = "z03"\n'.encode("latin-1"))
    assert main(["spec", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "must be UTF-8" in err and "Traceback" not in err
