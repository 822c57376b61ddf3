"""Every embedding format round-trips through its loader (ours and diffusers'), with the tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from likeness.embeddings import (
    TrainedEmbedding,
    load_embedding,
    load_into_pipeline,
    pipeline_dims,
    save_embedding,
    vectors_in_pipeline,
)
from likeness.errors import InvalidInput, NotFound

TOKEN = "3m1ly"


def _emb(family: str, n: int = 2, dims: dict[str, int] | None = None, seed: int = 0) -> TrainedEmbedding:
    g = torch.Generator().manual_seed(seed)
    dims = dims or ({"clip_l": 32} if family == "sd15" else {"clip_l": 32, "clip_g": 32})
    vectors = {k: torch.randn(n, d, generator=g) for k, d in dims.items()}
    return TrainedEmbedding(TOKEN, family, vectors, step=120, base_model="tiny-" + family, base_model_hash="abc123")


@pytest.fixture(scope="module")
def sd15_dir(tiny_models: Path) -> Path:
    return tiny_models / "sd15"


@pytest.fixture(scope="module")
def sdxl_dir(tiny_models: Path) -> Path:
    return tiny_models / "sdxl"


def _fresh(folder: Path):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe) -> None:
    out = pipe(f"photo of {TOKEN} woman", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (1, 64, 64, 3)


def _assert_same(a: TrainedEmbedding, b: TrainedEmbedding) -> None:
    assert a.family == b.family and sorted(a.vectors) == sorted(b.vectors)
    for k in a.vectors:
        assert torch.equal(a.vectors[k], b.vectors[k]), k


@pytest.mark.parametrize("fmt", ["a1111-pt", "safetensors", "diffusers"])
def test_sd15_format_loads_in_diffusers_and_generates(tmp_path: Path, sd15_dir: Path, fmt: str) -> None:
    emb = _emb("sd15")
    path = save_embedding(emb, tmp_path, fmt)
    assert path.name == ("learned_embeds.safetensors" if fmt == "diffusers" else f"{TOKEN}{path.suffix}")
    pipe = _fresh(sd15_dir)
    # diffusers' own loader reads the file from disk (A1111 files get the token from the caller, as in A1111).
    pipe.load_textual_inversion(str(path), token=TOKEN)
    rows = vectors_in_pipeline(pipe, TOKEN, emb.n_vectors)
    assert torch.equal(rows["clip_l"], emb.vectors["clip_l"])
    _generate(pipe)
    back = load_embedding(path)
    _assert_same(emb, back)
    assert back.token == TOKEN
    assert back.step == 120 and back.base_model == "tiny-sd15"
    assert pipeline_dims(pipe) == {"clip_l": 32}


@pytest.mark.parametrize("fmt", ["a1111-pt", "safetensors", "diffusers"])
def test_sdxl_format_loads_per_encoder_and_generates(tmp_path: Path, sdxl_dir: Path, fmt: str) -> None:
    emb = _emb("sdxl", n=3)
    path = save_embedding(emb, tmp_path, fmt)
    if fmt == "a1111-pt":
        state = torch.load(path, weights_only=True)
    else:
        from safetensors.torch import load_file

        state = load_file(path)
    assert sorted(state) == ["clip_g", "clip_l"]
    pipe = _fresh(sdxl_dir)
    # diffusers' SDXL convention: one load per text encoder.
    pipe.load_textual_inversion(state["clip_l"], token=TOKEN, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer)
    pipe.load_textual_inversion(state["clip_g"], token=TOKEN, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)
    rows = vectors_in_pipeline(pipe, TOKEN, 3)
    for k in ("clip_l", "clip_g"):
        assert torch.equal(rows[k], emb.vectors[k])
    _generate(pipe)
    back = load_embedding(path)
    _assert_same(emb, back)
    assert back.token == TOKEN


def test_load_into_pipeline_replaces_and_checks_dims(sdxl_dir: Path, sd15_dir: Path) -> None:
    pipe = _fresh(sdxl_dir)
    first, second = _emb("sdxl", seed=1), _emb("sdxl", n=3, seed=2)
    load_into_pipeline(pipe, first)
    load_into_pipeline(pipe, second)  # a later checkpoint replaces the earlier one
    rows = vectors_in_pipeline(pipe, TOKEN, 3)
    assert all(torch.equal(rows[k], second.vectors[k]) for k in rows)
    assert f"{TOKEN}_3" not in pipe.tokenizer.get_vocab()
    _generate(pipe)
    with pytest.raises(InvalidInput, match="SD 1.x"):
        load_into_pipeline(pipe, _emb("sd15", dims={"clip_l": 768}))
    sd15 = _fresh(sd15_dir)
    with pytest.raises(InvalidInput, match="SDXL"):
        load_into_pipeline(sd15, _emb("sdxl", dims={"clip_l": 768, "clip_g": 1280}))
    word = TrainedEmbedding("woman", "sd15", {"clip_l": torch.zeros(1, 32)}, 0, "x")
    with pytest.raises(InvalidInput, match="already a word"):
        load_into_pipeline(sd15, word)


def test_import_checks_dims_and_names_the_family(tmp_path: Path) -> None:
    sd15_dims = {"clip_l": 768}
    sd2 = save_embedding(_emb("sd15", dims={"clip_l": 1024}), tmp_path / "sd2.safetensors", "safetensors")
    with pytest.raises(InvalidInput, match="SD 2.x"):
        load_embedding(sd2, expect_dims=sd15_dims)
    with pytest.raises(InvalidInput, match="SD 2.x"):
        load_embedding(sd2)  # no family of ours takes a 1024-wide file
    xl = save_embedding(_emb("sdxl", dims={"clip_l": 768, "clip_g": 1280}), tmp_path / "xl.safetensors", "safetensors")
    with pytest.raises(InvalidInput, match=r"SDXL \(clip_l 768 \+ clip_g 1280\).*SD 1.x"):
        load_embedding(xl, expect_dims=sd15_dims)
    assert load_embedding(xl, expect_dims={"clip_l": 768, "clip_g": 1280}).family == "sdxl"


def test_foreign_files_and_bad_inputs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # A1111 .safetensors without our metadata: the token is the file name, as in A1111.
    save_file({"emb_params": torch.ones(4, 32)}, str(tmp_path / "charturner.safetensors"))
    got = load_embedding(tmp_path / "charturner.safetensors")
    assert got.token == "charturner" and got.n_vectors == 4 and got.family == "sd15"
    # An old-style A1111 .pt with a 1-D vector and a Parameter.
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.ones(32))}, "name": "old", "step": 7},
               tmp_path / "x.pt")
    old = load_embedding(tmp_path / "x.pt")
    assert (old.token, old.step, old.n_vectors) == ("old", 7, 1)
    assert load_embedding(tmp_path / "x.pt", token="renamed").token == "renamed"
    with pytest.raises(NotFound):
        load_embedding(tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(InvalidInput, match="not an embedding file"):
        load_embedding(tmp_path / "notes.pt")
    save_file({"a": torch.ones(1, 32), "b": torch.ones(1, 32)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(InvalidInput, match="unknown embedding layout"):
        load_embedding(tmp_path / "two.safetensors")
    save_file({"clip_g": torch.ones(1, 32)}, str(tmp_path / "half.safetensors"))
    with pytest.raises(InvalidInput, match="needs both"):
        load_embedding(tmp_path / "half.safetensors")
    with pytest.raises(InvalidInput, match="must end in .pt"):
        save_embedding(_emb("sd15"), tmp_path / "e.safetensors", "a1111-pt")
    with pytest.raises(InvalidInput, match="use one of"):
        save_embedding(_emb("sd15"), tmp_path / "e.pt", "ckpt")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="clip_g"):
        TrainedEmbedding(TOKEN, "sdxl", {"clip_l": torch.ones(1, 32)}, 0, "x")
    with pytest.raises(InvalidInput, match="same number"):
        TrainedEmbedding(TOKEN, "sdxl", {"clip_l": torch.ones(1, 32), "clip_g": torch.ones(2, 32)}, 0, "x")
    assert not list(tmp_path.glob(".*tmp*"))  # atomic writes leave nothing behind


def test_cli_export_converts_between_formats(tmp_path: Path, capsys) -> None:
    from likeness.cli.main import main

    emb = _emb("sdxl")
    src = save_embedding(emb, tmp_path / "3m1ly.safetensors", "safetensors")
    for fmt, name in (("a1111-pt", "out.pt"), ("diffusers", "learned_embeds.safetensors")):
        assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / name)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["family"] == "sdxl" and doc["dims"] == {"clip_l": 32, "clip_g": 32}
        _assert_same(emb, load_embedding(tmp_path / name, token=TOKEN))
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "a1111-pt", "--out", str(tmp_path / "x.pt")]) == 3


def test_cli_export_to_a_new_folder_creates_it(tmp_path: Path, capsys) -> None:
    # The help says --out may be a folder; a folder that does not exist yet was refused
    # as "a diffusers embedding file must end in .safetensors".
    from likeness.cli.main import main

    emb = _emb("sd15")
    src = save_embedding(emb, tmp_path / "3m1ly.safetensors", "safetensors")
    for fmt, folder, name in (("diffusers", "diff", "learned_embeds.safetensors"), ("a1111-pt", "a1111/", "3m1ly.pt")):
        assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / "new" / folder)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert Path(doc["file"]) == tmp_path / "new" / folder.rstrip("/") / name
        _assert_same(emb, load_embedding(doc["file"], token=TOKEN))
    # A file name with the wrong suffix is still an error, not a folder.
    assert main(["export", str(src), "--format", "diffusers", "--out", str(tmp_path / "x.pt")]) == 2
    assert "must end in .safetensors" in capsys.readouterr().err


def test_damaged_pt_is_one_clear_error_without_torch_warnings(tmp_path: Path) -> None:
    import warnings

    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80hello")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(InvalidInput, match="not a loadable PyTorch embedding"):
            load_embedding(bad)
    assert not caught, [str(w.message) for w in caught]


# --- .pt files A1111 accepts -------------------------------------------------------------------

# A1111's rule (modules/safe.py, learned from its source): before unpickling a .pt it opens it as a
# zip and refuses it ("bad file inside ...") unless EVERY record is <top>/data.pkl, <top>/version,
# <top>/byteorder, <top>/data/<n> or <top>/.data/serialization_id, with exactly one data.pkl.
# Releases before 1.6 allowed only data.pkl, version and data/<n>, and read the first record as
# the pickle. Its unpickler then allows only a short list of globals.
A1111_RECORD = r"^([^/]+)/((data/\d+)|version|byteorder|\.data/serialization_id|(data\.pkl))$"
A1111_OLD_RECORD = r"^([^/]+)/((data/\d+)|version|(data\.pkl))$"


def _a1111_globals_ok(module: str, name: str) -> bool:
    # The globals A1111's RestrictedUnpickler lets a tensor file use (the ones torch writes).
    return (module, name) in {("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
                              ("collections", "OrderedDict")} or (module == "torch" and name.endswith("Storage"))


def assert_a1111_accepts(path: Path) -> None:
    import pickletools
    import re
    import zipfile

    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        bad = [n for n in names if not re.match(A1111_RECORD, n)]
        assert not bad, f"A1111 refuses {path.name}: bad file inside: {bad}"
        assert all(re.match(A1111_OLD_RECORD, n) for n in names), names  # also A1111 < 1.6
        pkls = [n for n in names if n.endswith("/data.pkl")]
        assert len(pkls) == 1 and names[0] == pkls[0], names
        assert len({n.split("/", 1)[0] for n in names}) == 1, names
        for op, arg, _ in pickletools.genops(z.read(pkls[0])):
            if op.name == "GLOBAL":
                module, name = str(arg).split(" ", 1)
                assert _a1111_globals_ok(module, name), f"A1111's unpickler forbids {module}/{name}"
            assert op.name != "STACK_GLOBAL", "a protocol-4 pickle: its globals are not checked here"


def test_a1111_rule_bites_on_plain_torch_save_and_passes_real_a1111_files(tmp_path: Path, realdata: Path) -> None:
    # The rule as stated is A1111's: a plain torch.save of this torch refuses, files A1111 wrote pass.
    torch.save({"x": torch.ones(2)}, tmp_path / "plain.pt")
    with pytest.raises(AssertionError, match="format_version"):
        assert_a1111_accepts(tmp_path / "plain.pt")
    real = sorted((realdata / "generated").rglob("*.pt"))
    assert len(real) >= 10
    for path in real:
        assert_a1111_accepts(path)


def test_every_pt_the_project_writes_passes_a1111s_check(tmp_path: Path) -> None:
    import re

    from likeness.embeddings import save_pt

    # Every .pt writer of the package goes through save_pt: no other torch.save call exists.
    pkg = Path(__file__).resolve().parents[1] / "service" / "likeness"
    writers = {str(p.relative_to(pkg)) for p in pkg.rglob("*.py") if re.search(r"torch\.save\(", p.read_text())}
    assert writers == {"embeddings.py"}, writers
    # The embedding export ...
    emb = _emb("sd15", n=3, dims={"clip_l": 768})
    path = save_embedding(emb, tmp_path, "a1111-pt")
    assert_a1111_accepts(path)
    back = torch.load(path, map_location="cpu", weights_only=True)
    assert torch.equal(back["string_to_param"]["*"], emb.vectors["clip_l"]) and back["name"] == TOKEN
    mapped = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # torch's alignment kept
    assert torch.equal(mapped["string_to_param"]["*"], emb.vectors["clip_l"])
    _assert_same(emb, load_embedding(path))
    # ... the SDXL .pt ...
    xl = _emb("sdxl", n=2, dims={"clip_l": 768, "clip_g": 1280})
    assert_a1111_accepts(save_embedding(xl, tmp_path / "xl.pt", "a1111-pt"))
    _assert_same(xl, load_embedding(tmp_path / "xl.pt"))
    # ... and the trainer's state.pt (checkpoints.save_checkpoint writes it with save_pt): an AdamW state.
    p = torch.nn.Parameter(torch.randn(2, 32))
    opt = torch.optim.AdamW([p], lr=1e-3)
    p.grad = torch.randn(2, 32)
    opt.step()
    state = {"vectors": p.detach().clone(), "optimizer": opt.state_dict(), "step": 6, "scaler": None}
    assert_a1111_accepts(save_pt(state, tmp_path / "state.pt"))
    got = torch.load(tmp_path / "state.pt", map_location="cpu", weights_only=True)
    assert torch.equal(got["vectors"], state["vectors"]) and got["step"] == 6
    assert torch.equal(got["optimizer"]["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not list(tmp_path.glob(".*tmp*"))
