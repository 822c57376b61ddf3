"""PNG encoding overlapped with the next batch's denoising (issue 14), and what a failure leaves.

Real tiny pipeline on the CPU. The overlap is shown without timing: encoding a first-batch
image waits until the second batch has begun denoising, which can only happen when encoding
runs beside denoising (serially, it would wait for ever: the test gives it 20 s).
"""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from likeness.errors import Cancelled
from likeness.generate.manifest import read_manifest
from likeness.profiles import load_profile
from likeness.spec import spec_from_dict

SPEC = {
    "name": "Tiny", "token": "t1ny", "class_word": "woman", "traits": ["red curly hair"],
    "zooms": ["extreme closeup", "full body"], "angles": ["front shot", "side angle", "low angle shot"],
    "per_cell": 1, "sampling": {"steps": 2, "width": 64, "height": 64, "seed": 77, "sampler": "Euler"},
}


@pytest.fixture(scope="module")
def pipe(tiny_models):
    from likeness.backends.diffusion import load_pipeline

    return load_pipeline(load_profile("cpu-tiny"))


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """The same 6-image gallery rendered with encoding inside render_images (the Ray workers' path)."""
    from likeness.backends.diffusion import model_hash, model_name
    from likeness.generate.gallery import render_images
    from likeness.generate.plan import plan_gallery

    spec, prof = spec_from_dict(SPEC), load_profile("cpu-tiny")
    return {r.id: r.png for r in render_images(pipe, plan_gallery(spec), spec.sampling, batch_size=2,
                                               model=model_name(prof), model_hash=model_hash(prof))}


def _check_gallery(out, reference):
    """Every manifest row names a whole PNG with the reference's bytes; no temporaries."""
    rows = read_manifest(out)
    for r in rows:
        data = (out / r.file).read_bytes()
        assert data == reference[r.id]
        Image.open(io.BytesIO(data)).load()
    assert not [p for p in (out / "images").iterdir() if p.name.startswith(".")]
    return {r.id for r in rows}


def test_first_batch_is_encoded_while_the_second_denoises(pipe, tmp_path, monkeypatch, reference):
    import likeness.backends.diffusion as diffusion
    import likeness.generate.infotext as infotext
    from likeness.generate.gallery import generate_gallery

    denoise, png_bytes = diffusion.denoise, infotext.png_bytes
    calls, second_started = [], threading.Event()
    seen: list[tuple[int, bool, str]] = []  # (batch, second batch had begun, thread name)

    def counting_denoise(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            second_started.set()
        return denoise(*args, **kwargs)

    lock = threading.Lock()

    def waiting_png(image, parameters):
        with lock:  # the writer encodes in put order: the first two calls are the first batch's
            first_batch = len(seen) < 2
            seen.append((1 if first_batch else 2, False, threading.current_thread().name))
            i = len(seen) - 1
        ok = second_started.wait(20) if first_batch else True
        seen[i] = (seen[i][0], ok, seen[i][2])
        return png_bytes(image, parameters)

    monkeypatch.setattr(diffusion, "denoise", counting_denoise)
    monkeypatch.setattr(infotext, "png_bytes", waiting_png)
    res = generate_gallery(spec_from_dict(SPEC), tmp_path, "cpu-tiny", pipe=pipe, batch_size=2)
    assert res.generated == 6 and len(calls) == 3
    first = [s for s in seen if s[0] == 1]
    assert len(first) == 2 and all(ok for _, ok, _ in first)  # encoded while batch 2 denoised
    assert all(name.startswith("likeness-png-writer") for *_, name in seen)
    # Same bytes as encoding inside render_images: the writer changes when, not what.
    assert _check_gallery(tmp_path, reference) == set(reference)


def test_a_failed_write_leaves_only_whole_files_listed_and_resume_completes(pipe, tmp_path, monkeypatch, reference):
    import likeness.generate.gallery as gallery
    from likeness.generate.gallery import generate_gallery

    write = gallery.atomic_write_bytes
    failing = sorted(reference)[2]  # an image of the second batch (ids sort in plan order here)

    def disk_full_once(path, data):
        if path.stem == failing:
            raise OSError(28, "No space left on device", str(path))
        return write(path, data)

    monkeypatch.setattr(gallery, "atomic_write_bytes", disk_full_once)
    with pytest.raises(OSError, match="No space"):
        generate_gallery(spec_from_dict(SPEC), tmp_path, "cpu-tiny", pipe=pipe, batch_size=2)
    listed = _check_gallery(tmp_path, reference)
    assert failing not in listed and listed  # the first batch is kept, the failed one is not listed
    monkeypatch.setattr(gallery, "atomic_write_bytes", write)
    res = generate_gallery(spec_from_dict(SPEC), tmp_path, "cpu-tiny", pipe=pipe, batch_size=2)
    assert res.generated == 6 - len(listed) and _check_gallery(tmp_path, reference) == set(reference)


def test_cancel_keeps_the_batches_already_rendered(pipe, tmp_path, monkeypatch, reference):
    import likeness.backends.diffusion as diffusion
    from likeness.generate.gallery import generate_gallery
    from likeness.progress import CancelToken

    denoise, calls, cancel = diffusion.denoise, [], CancelToken()

    def cancel_in_third(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            cancel.cancel("stop")
        return denoise(*args, **kwargs)

    monkeypatch.setattr(diffusion, "denoise", cancel_in_third)
    events = []
    with pytest.raises(Cancelled):
        generate_gallery(spec_from_dict(SPEC), tmp_path, "cpu-tiny", pipe=pipe, batch_size=2, cancel=cancel,
                         progress=events.append)
    assert len(_check_gallery(tmp_path, reference)) == 4  # two finished batches written, in the manifest
    assert events[-1].done == 4


def test_the_writer_holds_at_most_max_batches(tmp_path, monkeypatch):
    import likeness.generate.gallery as gallery
    from likeness.generate.gallery import GalleryWriter, RenderedImage

    def slow_write(path, data):
        time.sleep(0.05)
        path.write_bytes(data)

    monkeypatch.setattr(gallery, "atomic_write_bytes", slow_write)
    order, waiting = [], []
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    with GalleryWriter(tmp_path, lambda tag, batch: order.append(tag), threads=1, max_batches=2) as w:
        for i in range(6):
            w.put(i, [RenderedImage(f"b{i}-{j}", b"", 0.0, 8, 8, image=img, infotext="x") for j in range(2)])
            waiting.append(len(w._pending))
    assert max(waiting) <= 2 and order == list(range(6))  # bounded, reported in order
    assert len(list(tmp_path.glob("*.png"))) == 12
