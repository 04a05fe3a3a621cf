"""Images in the store: read as transformers' `load_image` reads them (EXIF orientation applied),
pixels and grid bitwise equal to the checkpoint's own processor, tokens (and deepstack levels)
bitwise equal to the full model's `get_image_features`, through `qprep extract --media`, for every
family in both file layouts. The two layouts of one tiny checkpoint load the same weights into qprep,
store the same tokens and train the same.

References: `AutoProcessor.from_pretrained(checkpoint)` called on `transformers.image_utils.load_image`
of the file, and the full model class loaded with `from_pretrained` (tests/reference.py).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoProcessor
from transformers.image_utils import load_image

from qprep.pipeline.image import prepare_image
from qprep.pipeline.patchify import normalize
from qprep.schemas.settings import VideoSettings, load_model_spec
from reference import full_model, kinds_and_layouts
from conftest import LOCAL_EXTRACT, built_samples, make_image

FAMILIES = ["qwen2_5_omni", "qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen3_5", "qwen3_omni_moe"]


def processor_pixels(model_dir, path):
    processor = AutoProcessor.from_pretrained(model_dir)
    token = getattr(processor, "image_token", None) or "<|image_pad|>"
    return processor(text=[token], images=[load_image(str(path))], return_tensors="pt")


# name, width, height, PIL's save options
FORMATS = (("photo.jpg", 417, 300, {"quality": 90}), ("tall.png", 90, 260, {}), ("small.webp", 40, 30, {}),
           ("frame.bmp", 128, 72, {}), ("scan.tiff", 100, 75, {"compression": "tiff_lzw"}))


def make_animated_gif(path, width, height):
    """A GIF of three frames of noise, each its own: the first unlike the others."""
    from PIL import Image

    rng = np.random.default_rng(5)
    frames = [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(3)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


@pytest.mark.parametrize(("kind", "layout"), kinds_and_layouts(FAMILIES))
def test_image_pixels_and_grid_equal_the_checkpoints_processor(tiny_model, tmp_path, kind, layout):
    model_dir = tiny_model(kind, layout)
    spec = load_model_spec(model_dir)
    paths = [make_image(tmp_path / name, width, height, **save) for name, width, height, save in FORMATS]
    for path in paths + [make_animated_gif(tmp_path / "moving.gif", 96, 64)]:
        name = path.name
        ours = prepare_image(path, spec)
        reference = processor_pixels(model_dir, path)
        assert list(ours.grid_thw) == reference["image_grid_thw"][0].tolist(), name
        assert torch.equal(normalize(ours.patches, spec), reference["pixel_values"]), name


def test_an_animated_gif_is_read_at_its_first_frame_as_load_image_reads_it(tmp_path):
    """`load_image` opens the file and converts it as it stands, at frame 0; qprep reads the same
    pixels, not a later frame's (the family's processor on them: the test above)."""
    from PIL import Image

    from qprep.pipeline.image import load_upright

    path = make_animated_gif(tmp_path / "moving.gif", 96, 64)
    with Image.open(path) as gif:
        assert gif.n_frames == 3
        first = np.array(gif.convert("RGB"))
        gif.seek(1)
        second = np.array(gif.convert("RGB"))
    assert not np.array_equal(first, second)
    assert np.array_equal(np.array(load_image(str(path))), first)
    assert np.array_equal(load_upright(path), first)


def test_the_exif_orientation_is_applied_as_load_image_applies_it(tiny_model, tmp_path):
    """A photo stored sideways with orientation 6 (turn 90° clockwise to show it): qprep reads it
    upright, as transformers' `load_image` does (qwen-vl-utils' `fetch_image` would not turn it)."""
    model_dir = tiny_model("qwen2_5_vl")
    spec = load_model_spec(model_dir)
    turned = make_image(tmp_path / "turned.jpg", 320, 180, orientation=6, quality=95)
    ours = prepare_image(turned, spec)
    assert (ours.width, ours.height) == (180, 320)  # upright: as shown, not as stored
    reference = processor_pixels(model_dir, turned)
    assert torch.equal(normalize(ours.patches, spec), reference["pixel_values"])
    plain = make_image(tmp_path / "plain.jpg", 320, 180, quality=95)
    assert list(prepare_image(plain, spec).grid_thw) != list(ours.grid_thw)


def test_an_unreadable_image_is_an_error_naming_the_file(tiny_model, tmp_path):
    from qprep.errors import UnreadableFileError

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    with pytest.raises(UnreadableFileError, match="broken.png: cannot read it as an image"):
        prepare_image(broken, load_model_spec(tiny_model("qwen2_5_vl")))


@pytest.fixture(scope="module")
def media_folder(tmp_path_factory, videos):
    """A video, four images (one turned by EXIF, one GIF, one square) and a broken image."""
    import shutil

    root = tmp_path_factory.mktemp("media")
    shutil.copy(videos("media-a.mp4", width=112, height=84, fps=25, seconds=2), root / "a.mp4")
    make_image(root / "photos" / "cat.jpg", 200, 150, seed=1, quality=90)
    make_image(root / "photos" / "turned.jpg", 160, 96, seed=2, orientation=6, quality=90)
    make_image(root / "anim.gif", 64, 48, seed=3)
    make_image(root / "square.png", 256, 256, seed=4)
    (root / "photos" / "broken.png").write_bytes(b"not an image")
    return root


MEDIA = VideoSettings(fps=2, kinds=("video", "image"))  # `extract --media`


@pytest.fixture(scope="module")
def media_stores(media_folder, tiny_model, tmp_path_factory):
    """`media_stores(kind, layout)` → (model dir, summary of the run, store path) of `media_folder`
    extracted with `--media` (float32, 2 shards) from the tiny `kind` checkpoint in `layout`. Built
    once per case."""
    from qprep.extraction.run import ExtractOptions, extract

    made: dict[tuple[str, str], tuple] = {}

    def get(kind: str, layout: str):
        if (kind, layout) not in made:
            model_dir = tiny_model(kind, layout)
            store = tmp_path_factory.mktemp(f"{kind}-{layout}-media") / "store.zarr"
            summary = extract(media_folder, store, model_dir, MEDIA, dtype="float32", shards=2,
                              options=ExtractOptions(**LOCAL_EXTRACT))
            made[kind, layout] = model_dir, summary, store
        return made[kind, layout]

    return get


IMAGES = ("anim", "photos/cat", "photos/turned", "square")


@pytest.mark.parametrize(("kind", "layout"), kinds_and_layouts(FAMILIES))
def test_extract_media_caches_images_with_the_full_models_image_features(media_folder, media_stores, kind, layout):
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.store.status import store_status

    model_dir, summary, store = media_stores(kind, layout)
    assert (summary.extracted, summary.failed) == (5, 1)
    cache = open_cache(store)
    assert {i: cache.row(i).kind for i in cache.ids()} == {"a": "video", **dict.fromkeys(IMAGES, "image")}
    assert cache.row("photos/broken").error_code == "unreadable"
    assert store_status(store)["kinds"] == {"image": 4, "video": 1}
    full = full_model(model_dir)
    for image_id in IMAGES:
        cached = cache[image_id]
        reference = processor_pixels(model_dir, media_folder / cache.row(image_id).path)
        assert list(cached.grid_thw) == reference["image_grid_thw"][0].tolist()
        with torch.no_grad():
            output = full.get_image_features(reference["pixel_values"], reference["image_grid_thw"])
        assert torch.equal(cached.video_tokens, output.pooler_output[0]), image_id
        levels = getattr(output, "deepstack_features", None)
        assert (cached.deepstack is None) == (not levels)
        for level, features in enumerate(levels or ()):
            features = features[0] if isinstance(features, (list, tuple)) else features
            assert torch.equal(cached.deepstack[level], features)
    again = extract(media_folder, store, model_dir, MEDIA, dtype="float32", options=ExtractOptions(**LOCAL_EXTRACT))
    assert (again.up_to_date, again.extracted, again.failed) == (5, 0, 1)  # the broken image is tried again alone


# Every kind with a hub release, and the image both of its layouts keep at one size: the released
# files state other image bounds than save_pretrained's (Qwen3-VL and Qwen3.5: 65536–16777216 pixels
# against 4096–65536, which only a 65536-pixel image such as the 256×256 square fits).
SAME_SIZE_IMAGE = {"qwen2_5_omni": "photos/cat", "qwen2_5_vl": "photos/cat", "qwen2_vl": "photos/cat",
                   "qwen3_vl": "square", "qwen3_vl_moe": "square", "qwen3_5": "square", "qwen3_5_moe": "square",
                   "qwen3_omni_moe": "photos/cat"}


@pytest.mark.parametrize("kind", SAME_SIZE_IMAGE)
def test_both_file_layouts_of_a_checkpoint_load_the_same_weights_and_store_and_train_the_same(media_stores, kind,
                                                                                                 tmp_path):
    """The tiny checkpoint in the layout save_pretrained writes and in its release's (other weight
    names, fused or per-expert experts, config keys, processor and tokenizer files), from the same
    seed. Through qprep, bit for bit: the same tower weights; the same stored tokens (and deepstack
    levels) of an image both layouts' pixel bounds keep at one size; the same training sample and
    batch over it, the same language-model weights, loss and logits. A test of qprep's towers, store
    or training on one layout therefore holds for the other."""
    from qprep import open_cache

    image = SAME_SIZE_IMAGE[kind]
    (saved_dir, _, saved_store), (released_dir, _, released_store) = (media_stores(kind, layout)
                                                                      for layout in ("save_pretrained", "released"))
    assert_same_tensors(tower_weights(saved_dir), tower_weights(released_dir))
    saved_cache, released_cache = open_cache(saved_store), open_cache(released_store)
    assert saved_cache.store.fingerprint != released_cache.store.fingerprint  # two stores: other image bounds
    ours, theirs = saved_cache[image], released_cache[image]
    assert ours.grid_thw == theirs.grid_thw
    assert torch.equal(ours.video_tokens, theirs.video_tokens)
    assert (ours.deepstack is None) == (theirs.deepstack is None)
    assert ours.deepstack is None or torch.equal(ours.deepstack, theirs.deepstack)

    saved_run = trained_on(saved_dir, saved_cache, image, tmp_path / "save_pretrained")
    released_run = trained_on(released_dir, released_cache, image, tmp_path / "released")
    assert_same_tensors(saved_run.pop("weights"), released_run.pop("weights"))
    for name, value in saved_run.items():
        assert torch.equal(value, released_run[name]), name


def tower_weights(model_dir) -> dict:
    from qprep.models.checkpoint import open_checkpoint
    from qprep.pipeline.towers import Towers

    return Towers(open_checkpoint(model_dir), load_model_spec(model_dir), dtype="float32", device="cpu").state_dict()


def trained_on(model_dir, cache, image, folder) -> dict:
    """What `qprep train` makes of one question about `image` in `cache`: the padded batch's tensors,
    and its language model's weights, loss and logits on it."""
    from qprep.train.data import collate
    from qprep.train.model import LanguageModel

    record = {"id": "look", "media": [image], "conversations": [
        {"from": "human", "value": "<image> What is it?"}, {"from": "gpt", "value": "Noise and a bright corner."}]}
    folder.mkdir()
    checkpoint, layout, samples = built_samples([record], cache, model_dir, folder)
    batch = collate([samples["look"]], cache, layout)
    model = LanguageModel(checkpoint, dtype="float32").eval()
    with torch.no_grad():
        loss, logits = model(batch)
    tensors = {name: value for name, value in vars(batch).items() if isinstance(value, torch.Tensor)}
    return {**tensors, "weights": model.state_dict(), "loss": loss, "logits": logits}


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys() and ours
    assert [name for name in ours if not torch.equal(ours[name], theirs[name])] == []


def test_videos_alone_keep_their_store_and_fingerprint_and_a_media_run_is_told_apart(media_folder, tiny_model,
                                                                                       tmp_path):
    """`--videos` on a folder with images takes the videos alone, with the config (and so the
    fingerprint) stores had before images existed; the same store refuses a `--media` run, naming why."""
    from qprep.errors import StoreError
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.schemas.fingerprint import extraction_config
    from qprep.schemas.settings import VideoSettings

    model_dir = tiny_model("qwen2_5_vl")
    summary = extract(media_folder, tmp_path / "store.zarr", model_dir, VideoSettings(fps=2), dtype="float32",
                      shards=1, options=ExtractOptions(**LOCAL_EXTRACT))
    assert (summary.extracted, summary.failed) == (1, 0)
    spec = load_model_spec(model_dir)
    config = extraction_config(VideoSettings(fps=2), spec, {}, "float32", "sdpa")
    assert "kinds" not in config["settings"] and "image_pixels" not in config["preprocessor"]
    with pytest.raises(StoreError, match="settings.kinds"):
        extract(media_folder, tmp_path / "store.zarr", model_dir, VideoSettings(fps=2, kinds=("video", "image")),
                dtype="float32", options=ExtractOptions(**LOCAL_EXTRACT))


def test_a_manifest_written_before_kinds_existed_reads_as_videos():
    import pyarrow as pa

    from qprep.schemas.manifest import COLUMNS, conformed, rows_of

    old = pa.table({"id": ["a"], "path": ["a.mp4"], "size": [3], "mtime_ns": [1], "shard": [0], "shard_key": ["k"],
                    "fingerprint": ["f"], "status": ["ok"]})
    table = conformed(old)
    assert table.column_names == list(COLUMNS)
    assert rows_of(table)[0].kind == "video"


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_omni_moe"])
def test_verify_recomputes_images_with_transformers_and_finds_them_equal(media_store, kind):
    from qprep.audit.verify import verify

    _, cache = media_store(kind)
    report = verify(cache.store.root, sample=None, progress=False)
    checked = {result.id: result for result in report.results}
    assert {"photos/cat", "photos/turned", "a"} <= set(checked)
    for result in checked.values():
        assert result.ok, [(c.name, c.detail) for c in result.failed()]
    assert {c.name for c in checked["photos/cat"].checks} >= {"grid_thw", "video_tokens"}


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_fixed_shape_image_calls_give_an_image_the_same_bytes_whatever_shares_its_call(tiny_model, tmp_path,
                                                                                      monkeypatch, kind):
    """`--image-call-rows 1024`: several images a tower call, every call filled to 1,024 patch rows.
    Two runs put the same images beside other ones, at other offsets (another folder, other images
    before them, the pool's finishing order): their tokens and deepstack levels are equal bit for bit
    (every call has the same shape: the same arithmetic). Against the full model's own call on one
    image (another shape) they are held to a float32 tolerance. The call size is in the fingerprint."""
    from qprep import open_cache
    from qprep.extraction.run import ExtractOptions, extract
    from qprep.pipeline.towers import Towers
    from qprep.schemas.settings import VideoSettings
    from qprep.schemas.towers import Budget

    calls: list[int] = []
    own = Towers.image_features
    monkeypatch.setattr(Towers, "image_features", lambda self, images: calls.append(len(images)) or own(self, images))
    shared = {"shared-1": (200, 150), "shared-2": (96, 160), "shared-3": (120, 120)}
    others = {"a": (64, 48), "b": (180, 100), "c": (140, 210)}
    stores = []
    for run, names in (("one", [*shared, "a"]), ("two", ["b", "c", *reversed(shared)])):
        folder = tmp_path / run
        for index, name in enumerate(names):
            size = shared.get(name) or others[name]
            make_image(folder / f"{index}-{name}.jpg", *size, seed=sum(map(ord, name)), quality=90)
        options = ExtractOptions(**LOCAL_EXTRACT, budget=Budget(image_rows=1024))
        extract(folder, tmp_path / f"{run}.zarr", tiny_model(kind), VideoSettings(fps=2, kinds=("video", "image")),
                dtype="float32",
                shards=1, options=options)
        stores.append(open_cache(tmp_path / f"{run}.zarr"))
    assert max(calls) > 1  # images shared tower calls
    one, two = stores
    assert one.store.attrs["config"]["image_call_rows"] == 1024
    full = full_model(tiny_model(kind))
    for name in shared:
        ours = one[next(i for i in one.ids() if i.endswith(name))]
        theirs = two[next(i for i in two.ids() if i.endswith(name))]
        assert torch.equal(ours.video_tokens, theirs.video_tokens), name
        assert (ours.deepstack is None) == (kind != "qwen3_vl")
        if ours.deepstack is not None:
            assert torch.equal(ours.deepstack, theirs.deepstack), name
        reference = processor_pixels(tiny_model(kind), tmp_path / "one" / one.row(
            next(i for i in one.ids() if i.endswith(name))).path)
        with torch.no_grad():
            expected = full.get_image_features(reference["pixel_values"], reference["image_grid_thw"]).pooler_output[0]
        print(name, "largest difference from the full model's own call:",
              float((ours.video_tokens - expected).abs().max()))
        torch.testing.assert_close(ours.video_tokens, expected, rtol=1e-5, atol=1e-6)
    from qprep.audit.verify import FIXED_SHAPE_FLOAT32_TOLERANCE, verify

    report = verify(tmp_path / "one.zarr", sample=None, progress=False)  # one-image reference calls
    assert report.tolerance == FIXED_SHAPE_FLOAT32_TOLERANCE
    assert len(report.results) == 4 and all(result.ok for result in report.results)
