"""A1111's ``TI hashes`` and ``RNG`` infotext fields: written when we generate, read and resolved on import."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from PIL import Image

from likeness.errors import InvalidInput
from likeness.generate.gallery import infotext_for
from likeness.generate.importer import import_gallery, index_embeddings, resolve_ti_hashes
from likeness.generate.infotext import (
    format_infotext, format_ti_hashes, parse_infotext, parse_ti_hashes, png_bytes, read_parameters, rng_source,
    ti_hash, InfoText,
)
from likeness.generate.plan import PlannedImage
from likeness.spec import SamplingConfig

# What A1111 1.7.3 wrote for an image that used two embeddings (from a public parser's test data):
# the value is JSON-quoted because it holds colons, entries are "name: sha256[:12]" joined by ", ".
A1111_LINE = ('Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512, '
              'TI hashes: "AS-YoungestV2: c71427a287b5, AS-YoungV2: 714bba6525de", Version: 1.7.3')


def _item(prompt: str, negative: str = "") -> PlannedImage:
    return PlannedImage(id="g0", zoom_index=-1, angle_index=-1, index_in_cell=0, zoom="", angle="",
                        prompt=prompt, negative_prompt=negative, seed=7)


def _csv_hashes(folder: Path) -> dict[str, str]:
    """{file relative to folder: sha256} as the realdata CSV gives it (an independent record)."""
    with (folder / "files.csv").open(newline="") as fh:
        return {row["file"]: row["sha256"] for row in csv.DictReader(fh)}


def test_a1111_quoted_format_parses():
    info = parse_infotext("a prompt\n" + A1111_LINE)
    assert info.extra["TI hashes"] == "AS-YoungestV2: c71427a287b5, AS-YoungV2: 714bba6525de"
    assert parse_ti_hashes(info.extra["TI hashes"]) == {"AS-YoungestV2": "c71427a287b5", "AS-YoungV2": "714bba6525de"}


def test_infotext_for_writes_ti_hashes_and_rng_round_trip():
    sampling = SamplingConfig()
    text = infotext_for(_item("photo of 3m1ly cooking", "bad-hands"), sampling, "v1-5", "6ce0161689",
                        {"3m1ly": "0123456789ab", "bad-hands": "fedcba987654", "unused": "aaaaaaaaaaaa"})
    # A1111's layout: one quoted value, listing only the embeddings a prompt uses.
    assert 'TI hashes: "3m1ly: 0123456789ab, bad-hands: fedcba987654"' in text
    info = parse_infotext(text)
    assert parse_ti_hashes(info.extra["TI hashes"]) == {"3m1ly": "0123456789ab", "bad-hands": "fedcba987654"}
    assert rng_source(info) == "CPU" and info.extra["RNG"] == "CPU"
    # No embedding in the prompt: no field at all (A1111 writes none).
    plain = parse_infotext(infotext_for(_item("a cat"), sampling, "v1-5", "", {"3m1ly": "0123456789ab"}))
    assert "TI hashes" not in plain.extra


def test_format_ti_hashes_rules():
    # A1111 drops ':' and ',' from names so the list stays readable.
    assert format_ti_hashes({"a:b,c": "0123456789ab"}) == "abc: 0123456789ab"
    with pytest.raises(InvalidInput, match="12-digit"):
        format_ti_hashes({"tok": "0123"})


def test_rng_source_values():
    assert rng_source(InfoText()) == "GPU"  # A1111's default writes no field
    assert rng_source(InfoText(extra={"RNG": "NV"})) == "NV"
    with pytest.raises(InvalidInput, match="GPU, CPU, NV"):
        rng_source(InfoText(extra={"RNG": "quantum"}))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(st.characters(blacklist_characters=":,\n\r", blacklist_categories=("Cs",)),
                               min_size=1, max_size=12).filter(lambda s: s.strip() == s and s),
                       st.text("0123456789abcdef", min_size=12, max_size=12), max_size=4))
def test_ti_hashes_round_trip_property(hashes):
    text = format_infotext(InfoText(prompt="p", steps=20, seed=1, extra={"TI hashes": format_ti_hashes(hashes)}))
    assert parse_ti_hashes(parse_infotext(text).extra["TI hashes"]) == hashes


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_parse_ti_hashes_never_crashes(value):
    out = parse_ti_hashes(value)
    assert all(isinstance(k, str) and k and isinstance(v, str) for k, v in out.items())


def test_ti_hash_of_real_embedding_files(realdata):
    for folder in ("sd_webui_fork_fgjd", "mayaru_bestconfig", "ttekcor_embedding", "fastai_diffusion_nbs"):
        root = realdata / "generated" / folder
        for rel, sha in _csv_hashes(root).items():
            if Path(rel).suffix in (".pt", ".bin", ".safetensors"):
                assert ti_hash(root / rel) == sha[:12], rel


def _png(text: str) -> bytes:
    return png_bytes(Image.new("RGB", (64, 64), (120, 90, 60)), text)


def test_import_resolves_ti_hashes_against_real_embeddings(realdata, tmp_path):
    emb_dir = realdata / "generated" / "sd_webui_fork_fgjd" / "embeddings"
    sha = {Path(k).name: v for k, v in _csv_hashes(emb_dir.parent).items() if k.startswith("embeddings/")}
    easy, hands = sha["EasyNegativeV2.safetensors"][:12], sha["bad-hands-5.pt"][:12]
    src = tmp_path / "src"
    src.mkdir()
    line = (f'Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 5, Size: 64x64, RNG: NV, '
            f'TI hashes: "EasyNegativeV2: {easy}, hands: {hands}, gone: 0123456789ab"')
    (src / "a.png").write_bytes(_png("a photo, closeup, front shot\nNegative prompt: EasyNegativeV2, hands\n" + line))
    (src / "b.png").write_bytes(_png("a photo, closeup, side angle\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 6"))
    res = import_gallery(src, tmp_path / "out", embeddings_dir=emb_dir)
    report = json.loads(Path(res.report).read_text())
    assert report["images"] == res.images
    by_rng = {rec["rng"]: rec for rec in res.images.values()}
    assert set(by_rng) == {"NV", "GPU"}  # no RNG field is A1111's GPU default
    entries = {e["token"]: e for e in by_rng["NV"]["ti_hashes"]}
    assert entries["EasyNegativeV2"]["file"] == "EasyNegativeV2.safetensors" and entries["EasyNegativeV2"]["note"] == ""
    # Found by hash under another name: resolved, with what A1111 would need.
    assert entries["hands"]["file"] == "bad-hands-5.pt" and "rename it to hands.pt" in entries["hands"]["note"]
    assert entries["gone"]["file"] == "" and "no file in the embeddings folder" in entries["gone"]["note"]
    # The image keeps A1111's text as it was.
    nv_id = next(i for i, r in res.images.items() if r["rng"] == "NV")
    assert line in read_parameters((Path(res.gallery_dir) / "images" / f"{nv_id}.png").read_bytes())

    # Without a folder the hashes are still recorded, with how to resolve them.
    res2 = import_gallery(src, tmp_path / "out2")
    rec = next(r for r in res2.images.values() if "ti_hashes" in r)
    assert all(e["file"] == "" and "--embeddings" in e["note"] for e in rec["ti_hashes"])


def test_index_embeddings_and_bad_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.pt").write_bytes(b"abc")
    (tmp_path / "notes.txt").write_bytes(b"abc")
    # sha256("abc") = ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad
    assert index_embeddings(tmp_path) == {"ba7816bf8f01": ["sub/x.pt"]}
    assert resolve_ti_hashes("x: BA7816BF8F01", index_embeddings(tmp_path))[0]["file"] == "sub/x.pt"
    assert "not A1111's 12-digit" in resolve_ti_hashes("x: zz", {})[0]["note"]
    with pytest.raises(InvalidInput, match="embeddings folder"):
        index_embeddings(tmp_path / "missing")


def test_gallery_with_a_trained_token_writes_the_files_ti_hash(tmp_path, tiny_models):
    """A refinement-style gallery (the token in the prompt): every PNG names the embedding file's hash,
    in-process and through workers; a gallery without the embedding names none. RNG: CPU on both."""
    import torch

    from likeness.backends.diffusion import load_pipeline
    from likeness.embeddings import TrainedEmbedding, load_embedding, save_embedding
    from likeness.executor import LocalExecutor
    from likeness.generate.gallery import generate_gallery
    from likeness.profiles import load_profile
    from likeness.spec import spec_from_dict

    spec = spec_from_dict({
        "name": "Tok", "token": "t0k3n", "class_word": "woman", "template": "photo of t0k3n, {zoom}, {angle}",
        "per_cell": 1, "zooms": ["closeup"], "angles": ["front shot"], "profile": "cpu-tiny",
        "sampling": {"steps": 1, "width": 64, "height": 64, "seed": 5},
    })
    g = torch.Generator().manual_seed(0)
    path = save_embedding(TrainedEmbedding(token="t0k3n", family="sd15", vectors={"clip_l": torch.randn(2, 32, generator=g)},
                                           step=1, base_model="sd15"), tmp_path / "t0k3n.safetensors", "safetensors")
    emb = load_embedding(path)
    hashes = {emb.token: ti_hash(path)}
    pipe = load_pipeline(load_profile("cpu-tiny"))
    for name, kwargs in (("direct", {"pipe": pipe}), ("workers", {"executor": LocalExecutor()})):
        generate_gallery(spec, tmp_path / name, "cpu-tiny", embedding=emb, ti_hashes=hashes, batch_size=1, **kwargs)
        (png,) = (tmp_path / name / "images").glob("*.png")
        info = parse_infotext(read_parameters(png.read_bytes()))
        assert parse_ti_hashes(info.extra["TI hashes"]) == hashes, name
        assert rng_source(info) == "CPU"
    # The hash resolves back to the file on import.
    assert resolve_ti_hashes(format_ti_hashes(hashes), index_embeddings(tmp_path))[0]["file"] == "t0k3n.safetensors"
