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
    # Named after the token: A1111 and ComfyUI take the trigger word from the file name.
    assert path.name == f"{TOKEN}{path.suffix}"
    pipe = _fresh(sd15_dir)
    # diffusers' own loader reads the file from disk and finds the token where diffusers looks for it
    # (the key of a diffusers file, `name` of an A1111 .pt); emb_params carries none, so it is given.
    pipe.load_textual_inversion(str(path), token=TOKEN if fmt == "safetensors" else None)
    assert TOKEN in pipe.tokenizer.get_vocab()
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
    sd2 = save_embedding(_emb("sd15", dims={"clip_l": 1024}), tmp_path / "sd2", "safetensors")
    with pytest.raises(InvalidInput, match="SD 2.x"):
        load_embedding(sd2, expect_dims=sd15_dims)
    with pytest.raises(InvalidInput, match="SD 2.x"):
        load_embedding(sd2)  # no family of ours takes a 1024-wide file
    xl = save_embedding(_emb("sdxl", dims={"clip_l": 768, "clip_g": 1280}), tmp_path / "xl", "safetensors")
    with pytest.raises(InvalidInput, match=r"SDXL \(clip_l 768 \+ clip_g 1280\).*SD 1.x"):
        load_embedding(xl, expect_dims=sd15_dims)
    assert load_embedding(xl, expect_dims={"clip_l": 768, "clip_g": 1280}).family == "sdxl"


def test_foreign_files_and_bad_inputs(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    # A1111 .safetensors without our metadata: the token is the file name, as in A1111.
    save_file({"emb_params": torch.ones(4, 32)}, str(tmp_path / "charturner.safetensors"))
    got = load_embedding(tmp_path / "charturner.safetensors")
    assert got.token == "charturner" and got.n_vectors == 4 and got.family == "sd15"
    # An old-style A1111 .pt with a 1-D vector and a Parameter: A1111 calls it "x", after the file.
    torch.save({"string_to_param": {"*": torch.nn.Parameter(torch.ones(32))}, "name": "old", "step": 7},
               tmp_path / "x.pt")
    old = load_embedding(tmp_path / "x.pt")
    assert (old.token, old.step, old.n_vectors) == ("x", 7, 1)
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
    for fmt, folder in (("a1111-pt", "a1111"), ("diffusers", "diffusers")):
        assert main(["export", str(src), "--format", fmt, "--out", str(tmp_path / folder)]) == 0
        doc = json.loads(capsys.readouterr().out)
        assert doc["family"] == "sdxl" and doc["dims"] == {"clip_l": 32, "clip_g": 32} and doc["token"] == TOKEN
        assert Path(doc["file"]).name == TOKEN + Path(doc["file"]).suffix
        back = load_embedding(doc["file"])  # the trigger word comes back from the file name
        _assert_same(emb, back)
        assert back.token == TOKEN
    assert main(["export", str(tmp_path / "nope.pt"), "--format", "a1111-pt", "--out", str(tmp_path / "x.pt")]) == 3


def test_export_to_a_file_not_named_after_the_token_is_refused(tmp_path: Path, capsys) -> None:
    # A1111 and ComfyUI would call out.pt "out": writing it under the token's name or renaming
    # the token are the two honest choices.
    from likeness.cli.main import main

    src = save_embedding(_emb("sd15"), tmp_path, "safetensors")
    assert main(["export", str(src), "--format", "a1111-pt", "--out", str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err
    assert "would call this embedding 'out'" in err and "3m1ly.pt" in err and "--token" in err
    assert not (tmp_path / "out.pt").exists()
    assert main(["export", str(src), "--format", "a1111-pt", "--out", str(tmp_path / "out.pt"), "--token", "out"]) == 0
    capsys.readouterr()
    back = load_embedding(tmp_path / "out.pt")
    assert back.token == "out" and torch.load(tmp_path / "out.pt", weights_only=True)["name"] == "out"


def test_cli_export_to_a_new_folder_creates_it(tmp_path: Path, capsys) -> None:
    # The help says --out may be a folder; a folder that does not exist yet was refused
    # as "a diffusers embedding file must end in .safetensors".
    from likeness.cli.main import main

    emb = _emb("sd15")
    src = save_embedding(emb, tmp_path / "3m1ly.safetensors", "safetensors")
    for fmt, folder, name in (("diffusers", "diff", "3m1ly.safetensors"), ("a1111-pt", "a1111/", "3m1ly.pt")):
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
    xl_path = save_embedding(xl, tmp_path / "xl", "a1111-pt")
    assert_a1111_accepts(xl_path)
    _assert_same(xl, load_embedding(xl_path))
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


# --- embeddings from the wild --------------------------------------------------------------------

# Every embedding file in ../shared/realdata/generated/: (path, trigger word, vectors, step).
# The trigger word is what the file's own tool calls it: A1111 and ComfyUI the file name (so
# badhandv4.pt, which stores name='badhandv3', is badhandv4), diffusers the key.
REAL_EMBEDDINGS = [
    ("mayaru_bestconfig/embeddings/bad-artist-anime.pt", "bad-artist-anime", 2, 1850),  # name='bad-artist-2'
    ("mayaru_bestconfig/embeddings/bad-artist.pt", "bad-artist", 2, 1875),
    ("mayaru_bestconfig/embeddings/bad-hands-5.pt", "bad-hands-5", 2, 1419),
    ("mayaru_bestconfig/embeddings/bad-prompt.pt", "bad-prompt", 16, 8000),  # name='bad_prompt'
    ("mayaru_bestconfig/embeddings/bad_prompt_version2.pt", "bad_prompt_version2", 8, 12000),
    ("mayaru_bestconfig/embeddings/eyeliner2.pt", "eyeliner2", 3, 3727),
    ("mayaru_bestconfig/models/Lora/EasyNegative.safetensors", "EasyNegative", 8, 0),  # emb_params
    ("sd_webui_fork_fgjd/embeddings/EasyNegative.pt", "EasyNegative", 8, 0),  # emb_params inside a .pt
    ("sd_webui_fork_fgjd/embeddings/EasyNegativeV2.safetensors", "EasyNegativeV2", 16, 0),
    ("sd_webui_fork_fgjd/embeddings/bad-hands-5.pt", "bad-hands-5", 2, 1364),
    ("sd_webui_fork_fgjd/embeddings/badhandv4.pt", "badhandv4", 6, 15001),  # name='badhandv3'
    ("sd_webui_fork_fgjd/embeddings/charturnerv2.pt", "charturnerv2", 15, 660),  # name='testTurner'
    ("sd_webui_fork_fgjd/embeddings/corneo_makima.pt", "corneo_makima", 16, 8000),
    ("sd_webui_fork_fgjd/embeddings/negative_hand-neg.pt", "negative_hand-neg", 8, 8000),  # name='negative_hand'
    ("fastai_diffusion_nbs/learned_embeds.bin", "<birb-style>", 1, 0),  # diffusers, a 1-D [768] tensor
    ("ttekcor_embedding/learned_embeds.safetensors", "<detail-schemas>", 1, 0),  # diffusers, [1, 768]
]


@pytest.mark.parametrize("rel,token,n,step", REAL_EMBEDDINGS, ids=[r[0].rsplit("/", 1)[-1] for r in REAL_EMBEDDINGS])
def test_every_real_embedding_file_loads_with_its_peers_trigger_word(realdata: Path, rel: str, token: str, n: int,
                                                                      step: int) -> None:
    path = realdata / "generated" / rel
    emb = load_embedding(path)
    assert (emb.token, emb.n_vectors, emb.step, emb.family, emb.dims()) == (token, n, step, "sd15", {"clip_l": 768})
    assert load_embedding(path, expect_dims={"clip_l": 768}).token == token
    # The values are the file's own, not a conversion of them.
    raw = torch.load(path, map_location="cpu", weights_only=True) if path.suffix != ".safetensors" else None
    if raw is not None and "string_to_param" in raw:
        assert torch.equal(emb.vectors["clip_l"], next(iter(raw["string_to_param"].values())).float())
    with pytest.raises(InvalidInput, match="SD 1.x"):
        load_embedding(path, expect_dims={"clip_l": 768, "clip_g": 1280})


def test_real_files_cover_every_embedding_in_realdata(realdata: Path) -> None:
    found = {str(p.relative_to(realdata / "generated")) for ext in ("*.pt", "*.bin", "*.safetensors")
             for p in (realdata / "generated").rglob(ext)}
    assert found == {r[0] for r in REAL_EMBEDDINGS} | {"sd_webui_fork_fgjd/test/test_files/empty.pt"}


def test_real_empty_pt_is_a_clear_error(realdata: Path) -> None:
    # A1111's own test fixture: an empty dict.
    with pytest.raises(InvalidInput, match="holds no tensors"):
        load_embedding(realdata / "generated/sd_webui_fork_fgjd/test/test_files/empty.pt")


def test_a_real_file_exports_under_its_trigger_word_and_a1111_accepts_it(realdata: Path, tmp_path: Path) -> None:
    emb = load_embedding(realdata / "generated/sd_webui_fork_fgjd/embeddings/badhandv4.pt")
    for fmt in ("a1111-pt", "safetensors", "diffusers"):
        out = save_embedding(emb, tmp_path / fmt, fmt)
        assert out.name == "badhandv4" + out.suffix
        back = load_embedding(out)
        assert back.token == "badhandv4" and torch.equal(back.vectors["clip_l"], emb.vectors["clip_l"])
    assert_a1111_accepts(tmp_path / "a1111-pt" / "badhandv4.pt")


def test_names_that_are_not_trigger_words_fall_back(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vec = torch.randn(2, 768)
    a1111 = {"string_to_token": {"*": 265}, "string_to_param": {"*": vec}, "name": "_EmbeddingMerge_temp", "step": 1}
    torch.save(a1111, tmp_path / "my_merge.pt")
    assert load_embedding(tmp_path / "my_merge.pt").token == "my_merge"  # the file name, as A1111
    # A file name with a space is no prompt word: the stored name is, unless it is a placeholder.
    torch.save(dict(a1111, name="goodname"), tmp_path / "my merge.pt")
    assert load_embedding(tmp_path / "my merge.pt").token == "goodname"
    torch.save(a1111, tmp_path / "my merge2.pt")
    with pytest.raises(InvalidInput, match=r"_EmbeddingMerge_temp.*--token"):
        load_embedding(tmp_path / "my merge2.pt")
    assert load_embedding(tmp_path / "my merge2.pt", token="merge2").token == "merge2"
    # diffusers keys with spaces (sd-concepts-library's <Le Petit Prince-moon >): the file name.
    torch.save({"<Le Petit Prince-moon >": torch.randn(768)}, tmp_path / "le-petit-prince-moon.bin")
    got = load_embedding(tmp_path / "le-petit-prince-moon.bin")
    assert got.token == "le-petit-prince-moon" and got.n_vectors == 1
    # ... unless the file has diffusers' default name, which names nothing.
    torch.save({"<Le Petit Prince-moon >": torch.randn(768)}, tmp_path / "learned_embeds.bin")
    with pytest.raises(InvalidInput, match=r"'learned_embeds'.*'<Le Petit Prince-moon >'.*--token"):
        load_embedding(tmp_path / "learned_embeds.bin")
    save_file({"<cat-toy>": torch.randn(1, 768)}, str(tmp_path / "learned_embeds.safetensors"))
    assert load_embedding(tmp_path / "learned_embeds.safetensors").token == "<cat-toy>"


@pytest.mark.parametrize("tensors,what", [
    ({"emb_params": torch.randn(2, 4096)}, "T5-XXL"),
    ({"sd3": torch.randn(77, 4096)}, "T5-XXL"),
    ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1280), "t5xxl": torch.randn(1, 4096)}, "T5"),
    ({"emb_params": torch.randn(2, 1024)}, "SD 2.x"),
    ({"emb_params": torch.randn(2, 1280)}, "clip_g, 1280 wide"),
    ({"emb_params": torch.randn(2, 512)}, "512 wide; SD's CLIP encoders are 768, 1024 or 1280"),
    ({"clip_l": torch.randn(1, 768), "clip_g": torch.randn(1, 1024)}, "clip_l 768 \\+ clip_g 1024"),
    ({"emb_params": torch.full((2, 768), float("nan"))}, "NaN"),
    ({"emb_params": torch.zeros(0, 768)}, "expected \\(n_vectors, dim\\)"),
    ({"emb_params": torch.zeros(2, 3, 768)}, "expected \\(n_vectors, dim\\)"),
], ids=["t5-emb_params", "t5-diffusers", "sd3-keys", "sd2", "clip_g-alone", "512", "bad-sdxl", "nan", "no-rows", "3d"])
def test_files_that_are_not_sd_clip_embeddings_are_refused_with_what_they_are(tmp_path: Path, tensors, what) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "x.safetensors"))
    with pytest.raises(InvalidInput, match=what):
        load_embedding(tmp_path / "x.safetensors")
    torch.save(tensors, tmp_path / "x.pt")
    with pytest.raises(InvalidInput, match=what):
        load_embedding(tmp_path / "x.pt")


def _malformed_files():
    from hypothesis import strategies as st

    shapes = st.lists(st.integers(0, 5), min_size=0, max_size=3).map(tuple)
    # Small tensors of 0-3 dims; the last dim is sometimes SD 1.5's 768 so that well-formed ones occur.
    tensors = st.builds(lambda shape, last: torch.ones(shape + (last,)) if len(shape) < 3 else torch.ones(shape),
                        shapes, st.sampled_from([0, 1, 3, 32, 768]))
    leaves = st.one_of(tensors, st.integers(), st.text(max_size=8), st.none())
    values = st.recursive(leaves, lambda inner: st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)
    keys = st.sampled_from(["string_to_param", "emb_params", "clip_l", "clip_g", "name", "step", "*", "", "x y"])
    state = st.dictionaries(keys, values, max_size=4)
    raw = st.binary(max_size=64).map(lambda b: ("bytes", b))
    prefixed = st.tuples(st.sampled_from([b"PK\x03\x04", b"\x80\x02", b"\x10\x00\x00\x00\x00\x00\x00\x00{"]),
                         st.binary(max_size=64)).map(lambda t: ("bytes", t[0] + t[1]))
    return st.one_of(raw, prefixed, state.map(lambda d: ("torch", d)), st.tuples(st.just("cut"), st.integers(1, 400)))


def test_malformed_files_give_invalid_input_never_a_crash(tmp_path: Path) -> None:
    import io
    import tempfile

    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    good = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.randn(2, 768)}, "name": "n"}, good)

    # 60 examples run in about 2 s on one core (each writes and reads a small file).
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(_malformed_files(), st.sampled_from([".pt", ".bin", ".safetensors"]))
    def check(item, suffix):
        kind, payload = item
        with tempfile.TemporaryDirectory(dir=tmp_path) as d:
            path = Path(d) / f"e{suffix}"
            if kind == "bytes":
                path.write_bytes(payload)
            elif kind == "cut":  # a real file cut short
                path.write_bytes(good.getvalue()[:payload])
            else:
                torch.save(payload, path)
            try:
                emb = load_embedding(path)
            except InvalidInput:
                return
            assert isinstance(emb, TrainedEmbedding) and emb.dims()["clip_l"] in (32, 768)

    check()
