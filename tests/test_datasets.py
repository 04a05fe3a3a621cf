"""Published dataset formats, read as their projects read them (DESIGN.md §12's examples): each
reader's records and its errors, the cache ids media get, and the same conversation written in
every format training on the same token ids and labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qprep.cli import main
from qprep.datasets import DataFile, load, read_records
from qprep.datasets.detect import detect
from qprep.datasets.media import cache_id
from qprep.datasets.record import Medium
from qprep.errors import SettingsError
from qprep.models.checkpoint import open_checkpoint
from qprep.train.data import IGNORE, build_dataset, load_records
from qprep.train.infer import choose_requests


def write(folder: Path, name: str, content) -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    else:
        path.write_text(json.dumps(content))
    return path


def touch(folder: Path, *names: str) -> Path:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    return folder


def read(path: Path, **options):
    records = load(DataFile(path, **options))
    return [(r["id"], [(t["from"], t["value"]) for t in r["conversations"]], r["media"]) for r in records], \
        records.skipped


# ---------------------------------------------------------------- the cache id, in one place

def test_a_medium_is_named_by_its_path_under_the_root_its_window_and_its_kind(tmp_path):
    root = tmp_path / "clips"
    assert cache_id(Medium("video", "cooking/a.mp4"), root) == "cooking/a"
    assert cache_id(Medium("video", "./cooking/a.mp4"), root) == "cooking/a"
    assert cache_id(Medium("video", str(root / "cooking" / "a.mp4")), root) == "cooking/a"
    assert cache_id(Medium("video", "file://" + str(root / "a.mkv")), root) == "a"
    assert cache_id(Medium("video", "cooking/a.mp4", start=12.5, end=30.0), root) == "cooking/a#t=12.5,30"
    assert cache_id(Medium("video", "a.mp4", start=12.5), root) == "a#t=12.5,"
    assert cache_id(Medium("video", "a.mp4", end=30), root) == "a#t=0,30"
    assert cache_id(Medium("video", "a.mp4", start=0.0), root) == "a"  # from 0 to the end is the whole file
    assert cache_id(Medium("video", "AO8RW", by_id=True, start=1, end=2), root) == "AO8RW#t=1,2"
    assert cache_id(Medium("image", "photos/cat.jpg"), root) == "photos/cat"
    assert cache_id(Medium("audio", "talks/a.mp3", start=1, end=2.25), root) == "talks/a.mp3#t=1,2.25"
    # a link in the root is named by its own path, as `qprep extract` names it, wherever it leads
    touch(tmp_path / "elsewhere", "a.mp4")
    root.mkdir()
    (root / "linked.mp4").symlink_to(tmp_path / "elsewhere" / "a.mp4")
    assert cache_id(Medium("video", str(root / "linked.mp4")), root) == "linked"
    for outside in (str(tmp_path / "elsewhere" / "a.mp4"), "../a.mp4", "https://host/a.mp4"):
        with pytest.raises(ValueError):
            cache_id(Medium("video", outside), root)


# ---------------------------------------------------------------- detection

@pytest.mark.parametrize("content, expected", [
    ([{"id": "a", "conversations": []}], "qprep"),
    ([{"conversations": [], "videos": ["a.mp4"]}], "llamafactory"),
    ([{"instruction": "q", "input": "", "output": "a"}], "llamafactory"),
    ([{"messages": [{"role": "user", "content": "q"}], "videos": ["a.mp4"]}], "swift"),
    ([{"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4"}]}]}], "blocks"),
    ([{"id": "x", "conversations": []}, {"id": "y", "conversations": [], "video": "a.mp4"}], "llava"),
    ([{"id": "a", "conversations": [], "meta": {"duration": 3}}], "longvale"),
    ({"AO8RW": {"duration": 33.75, "timestamps": [[0.0, 6.9]], "sentences": ["a."]}}, "grounding"),
    ([{"video": "a.mp4", "timestamp": [0, 1], "sentence": "a."}], "time-r1"),
    ({"a": 1}, None),
])
def test_the_format_is_detected_from_the_content(content, expected):
    assert detect(content) == expected


def test_an_unknown_file_or_format_is_refused_naming_the_file(tmp_path):
    path = write(tmp_path, "odd.json", [{"question": "q"}])
    with pytest.raises(SettingsError, match="odd.json: not a format"):
        load(DataFile(path))
    with pytest.raises(SettingsError, match="--format nope"):
        load(DataFile(path, format="nope"))


# ---------------------------------------------------------------- LLaMA-Factory

def llamafactory_demo(folder: Path) -> Path:
    """LLaMA-Factory's data/mllm_video_audio_demo.json and its dataset_info.json entry."""
    touch(folder, "mllm_demo_data/4.mp4", "mllm_demo_data/4.mp3")
    write(folder, "dataset_info.json", {"mllm_video_audio_demo": {
        "file_name": "mllm_video_audio_demo.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "videos": "videos", "audios": "audios"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}})
    return write(folder, "mllm_video_audio_demo.json", [
        {"messages": [{"content": "<video><audio>What is the video describing?", "role": "user"},
                      {"content": "A girl who is drawing a picture of a guitar and feel nervous.",
                       "role": "assistant"}],
         "videos": ["mllm_demo_data/4.mp4"], "audios": ["mllm_demo_data/4.mp3"]}])


def test_llamafactory_dataset_info_entry_its_tags_and_use_audio_in_video(tmp_path):
    data = llamafactory_demo(tmp_path)
    answer = ("assistant", "A girl who is drawing a picture of a guitar and feel nervous.")
    for named in (data, tmp_path / "dataset_info.json"):  # the data file (its entry found) or the index
        records, skipped = read(named, check_files=True)
        assert records == [("#0", [("user", "<video><audio>What is the video describing?"), answer],
                            ["mllm_demo_data/4", "mllm_demo_data/4.mp3"])] and skipped == {}
    # with use_audio_in_video the <video><audio> pair is the video with its own sound
    records, _ = read(data, use_audio_in_video=True)
    assert records == [("#0", [("user", "<video>What is the video describing?"), answer], ["mllm_demo_data/4"])]
    # each <video> takes the first <audio> after it; `audios` listing the videos again pairs by itself
    pairs = write(tmp_path, "pairs.json", [
        {"messages": [{"role": "user", "content": f"<video> then <video>, with their sound <audio>{tail}"},
                      {"role": "assistant", "content": "A."}],
         "videos": ["mllm_demo_data/4.mp4"] * 2, "audios": ["mllm_demo_data/4.mp4"] * 2}
        for tail in ("<audio>", "")])
    records, skipped = read(pairs, format="llamafactory")  # (detected alone, `messages` reads as ms-swift)
    assert records == [("#0", [("user", "<video> then <video>, with their sound "), ("assistant", "A.")],
                        ["mllm_demo_data/4", "mllm_demo_data/4"])]
    assert skipped == {f"{pairs}: use_audio_in_video: a <video> with no <audio> after it": ["record 1"]}


def test_llamafactory_bare_sharegpt_and_alpaca_files_and_what_it_refuses(tmp_path):
    touch(tmp_path / "media", "v/a.mp4", "b.mp4")
    touch(tmp_path, "b.mp4")
    turns = lambda *values: [{"from": role, "value": v} for role, v in zip(("human", "gpt") * 3, values)]
    data = write(tmp_path, "sharegpt.json", [
        {"conversations": [{"from": "system", "value": "Be brief."}] + turns("<video>What?", "A."),
         "videos": "v/a.mp4"},
        {"conversations": turns("What?", "A."), "videos": ["b.mp4"]},            # no tag: LLaMA-Factory refuses
        {"conversations": turns("<video>What?"), "videos": ["b.mp4"]},           # no answer
        {"conversations": turns("<video>What?", "A.", "And?", "B."), "videos": ["b.mp4"]},
        {"conversations": [{"from": "gpt", "value": "A."}], "videos": []},       # answer first
        {"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "{}"}]},
        {"conversations": turns("<video>What?", "A."), "videos": ["nowhere.mp4"]},
    ])
    records, skipped = read(data, media_dir=tmp_path / "media", check_files=True)
    assert records == [
        ("#0", [("system", "Be brief."), ("user", "<video>What?"), ("assistant", "A.")], ["v/a"]),
        ("#3", [("user", "<video>What?"), ("assistant", "A."), ("user", "And?"), ("assistant", "B.")], ["b"]),
    ]
    causes = {cause.split(": ", 1)[1]: names for cause, names in skipped.items()}
    assert all(cause.startswith(f"{data}: ") for cause in skipped)  # each reason names the file
    assert causes.pop("0 <video> tags for 1 video") == ["record 1"]
    assert causes.pop("no assistant answer to learn after the last user turn (LLaMA-Factory needs one)") == ["record 2"]
    assert list(causes.values()) == [["record 4"], ["record 5"], ["record 6"]]
    assert "unknown role 'gpt'" in list(causes)[0] and "tool turns" in list(causes)[1]
    assert list(causes)[2].startswith("missing file: nowhere.mp4 (looked for")
    # media_dir first, else the path as written (relative to the working directory)
    alpaca = write(tmp_path, "alpaca.json", [{"instruction": "<video>Describe it.", "input": "Briefly.", "output": "A.",
                                              "history": [["Hi", "Hello"]], "videos": [str(tmp_path / "b.mp4")]}])
    records, skipped = read(alpaca, check_files=True)
    assert records == [("#0", [("user", "Hi"), ("assistant", "Hello"), ("user", "<video>Describe it.\nBriefly."),
                               ("assistant", "A.")], ["b"])] and skipped == {}


# ---------------------------------------------------------------- ms-swift

def test_swift_places_missing_tags_first_and_reads_its_aliases(tmp_path):
    touch(tmp_path, "a.mp4", "cat.jpg", "talk.wav")
    data = write(tmp_path, "train.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What?"},
                      {"role": "assistant", "content": "A."}],
         "images": ["cat.jpg"], "videos": "a.mp4", "audios": ["talk.wav"]},
        {"conversations": [{"from": "human", "value": "Compare <video> and"}, {"from": "gpt", "value": "Same."}],
         "video": ["a.mp4", "a.mp4"]},
        {"messages": [{"role": "user", "content": "<image><image>What?"}, {"role": "assistant", "content": "A."}],
         "image": "cat.jpg"},
        {"messages": [{"role": "user", "content": "What?"}, {"role": "tool", "content": "{}"}]},
    ])
    records, skipped = read(data, check_files=True)
    # images, then audio, then video, each prepended to the first non-system message
    assert records[0] == ("#0", [("system", "Be brief."), ("user", "<video><audio><image>What?"), ("assistant", "A.")],
                          ["a", "talk.wav", "cat"])
    assert records[1] == ("#1", [("user", "<video>Compare <video> and"), ("assistant", "Same.")], ["a", "a"])
    assert len(records) == 2
    assert {cause.split(": ", 1)[1]: names for cause, names in skipped.items()} == {
        "2 <image> tags for 1 image": ["record 2"],
        "unknown role 'tool' (expected system, user, assistant, human, gpt)": ["record 3"]}


# ---------------------------------------------------------------- LLaVA / Qwen finetune

def test_llava_reads_image_for_the_video_and_lists_of_media(tmp_path):
    touch(tmp_path / "videos", "academic/v1.mp4", "academic/v2.mp4", "img/c.png")
    data = write(tmp_path, "llava_video.json", [
        {"id": "v1", "conversations": [{"from": "human", "value": "<image>\nWhat happens?"},
                                       {"from": "gpt", "value": "A."}], "video": "academic/v1.mp4"},
        {"id": "two", "conversations": [{"from": "human", "value": "<video> then <video>?"},
                                        {"from": "gpt", "value": "B."}],
         "video": ["academic/v1.mp4", "academic/v2.mp4"]},
        {"id": "pic", "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "C."}],
         "image": "img/c.png"},
        {"id": "bad", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "D."}],
         "video": "academic/v1.mp4"},
    ])
    records, skipped = read(data, media_dir=tmp_path / "videos", check_files=True)
    assert records == [
        ("v1", [("user", "<video>\nWhat happens?"), ("assistant", "A.")], ["academic/v1"]),
        ("two", [("user", "<video> then <video>?"), ("assistant", "B.")], ["academic/v1", "academic/v2"]),
        ("pic", [("user", "<image>\nWhat?"), ("assistant", "C.")], ["img/c"]),
    ]
    assert skipped == {f"{data}: 0 <video> tags for 1 video": ["record 3 (bad)"]}


# ---------------------------------------------------------------- content blocks

def test_content_blocks_carry_each_mediums_window_and_sampling(tmp_path):
    touch(tmp_path, "a.mp4", "cat.jpg")
    video = {"type": "video", "video": f"file://{tmp_path}/a.mp4", "video_start": 12.5, "video_end": 30,
             "fps": 2.0, "max_pixels": 360 * 420}
    data = write(tmp_path, "blocks.json", [
        {"messages": [{"role": "user", "content": [video, {"type": "text", "text": "What happens?"},
                                                   {"type": "image", "image": "cat.jpg"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A."}]}]},
        {"messages": [{"role": "user", "content": [{**video, "video_end": 10}, {"type": "text", "text": "?"}]},
                      {"role": "assistant", "content": "B."}]},
        {"messages": [{"role": "user", "content": [{**video, "nframes": 8}]}, {"role": "assistant", "content": "C."}]},
        {"messages": [{"role": "user", "content": [{**video, "fps": 1.0}]}, {"role": "assistant", "content": "D."}]},
    ])
    records, skipped = read(data)
    assert records == [("#0", [("user", "<video>What happens?<image>"), ("assistant", "A.")],
                        ["a#t=12.5,30", "cat"])]
    causes = sorted(cause.split(": ", 1)[1] for cause in skipped)
    assert causes[0].startswith("a#t=12.5,30 asked with {'fps': 1.0")  # one store entry per medium: one setting
    assert causes[1].startswith("bad time:") and "not after its start" in causes[1]
    assert "fps and nframes both set" in causes[2]
    unread = write(tmp_path, "unread.json", [
        {"messages": [{"role": "user", "content": [{"type": "video", "video": ["f1.jpg", "f2.jpg"]}]},
                      {"role": "assistant", "content": "A."}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "https://host/a.mp4"}]},
                      {"role": "assistant", "content": "A."}]},
        {"messages": [{"role": "user", "content": [{"type": "video", "video": "a.mp4", "speed": 2}]},
                      {"role": "assistant", "content": "A."}]},
    ])
    records, skipped = read(unread)
    assert records[0][2] == ["a"] and len(records) == 1  # a block's other keys are not sampling settings
    assert [cause.split(": ", 1)[1] for cause in skipped] == [
        "a video given as a list of frame images is not read (give the video file)",
        "https://host/a.mp4: remote media are not fetched (download them under --media-dir)"]
    record = next(r for r in read_records(DataFile(data)) if r.index == 0)
    assert (record.media[0].start, record.media[0].end, record.media[0].sampling) == \
        (12.5, 30.0, {"fps": 2.0, "max_pixels": 151200})
    assert record.media[0].file == tmp_path / "a.mp4" and record.media[1].file == tmp_path / "cat.jpg"


# ---------------------------------------------------------------- LongVALE / VTimeLLM

LONGVALE = {"id": "-0n3pnCXNYk", "conversations": [
    {"from": "human", "value": "<video>\nCould you detail events during different time segments?"},
    {"from": "gpt", "value": "From <s0> to <e0>, woman is counting money. From <s1> to <e1>, she smiles."}],
    "meta": {"duration": 54.2, "split": [129.8, 184.0], "token": {"<s0>": 0, "<e0>": 9.4, "<s1>": 49.4, "<e1>": 53.2}}}


def test_longvale_times_in_seconds_or_in_its_relative_units_and_its_clip_window(tmp_path):
    touch(tmp_path / "videos", "-0n3pnCXNYk.mkv")
    data = write(tmp_path, "longvale-sft-bp-7k.json", [LONGVALE])
    records, skipped = read(data, media_dir=tmp_path / "videos", check_files=True)
    question = ("user", LONGVALE["conversations"][0]["value"])
    assert records == [("-0n3pnCXNYk", [question, (
        "assistant", "From 0.0 to 9.4, woman is counting money. From 49.4 to 53.2, she smiles.")],
        ["-0n3pnCXNYk#t=129.8,184"])] and skipped == {}
    # LongVALE's loader: min(round(x / 54.2 * 100), 99), two digits: 0 → 00, 9.4 → 17, 49.4 → 91, 53.2 → 98
    records, _ = read(data, times="relative")
    assert records[0][1][1] == ("assistant", "From 00 to 17, woman is counting money. From 91 to 98, she smiles.")
    near_end = {**LONGVALE, "meta": {"duration": 10, "token": {"<s0>": 0, "<e0>": 9.99, "<s1>": 1, "<e1>": 2}}}
    records, _ = read(write(tmp_path, "end.json", [near_end]), times="relative")
    assert "From 00 to 99," in records[0][1][1][1] and records[0][2] == ["-0n3pnCXNYk"]  # capped at 99; no split


def test_longvale_bad_times_are_reported_with_the_record(tmp_path):
    bad = lambda **meta: {**LONGVALE, "meta": {**LONGVALE["meta"], **meta}}
    data = write(tmp_path, "bad.json", [
        bad(token={"<s0>": 0, "<e0>": 9.4, "<s1>": 49.4}),       # <e1> has no time
        bad(token={**LONGVALE["meta"]["token"], "<e1>": -1}),
        bad(token={**LONGVALE["meta"]["token"], "<e1>": 60}),      # past the clip
        bad(split=[184.0, 129.8]),
        {k: v for k, v in LONGVALE.items() if k != "id"},
    ])
    records, skipped = read(data, media_dir=tmp_path)
    assert records == []
    causes = {cause.split(": ", 1)[1]: names for cause, names in skipped.items()}
    assert causes == {
        "bad time: <e1> has no time in meta.token": ["record 0 (-0n3pnCXNYk)"],
        "bad time: meta.token <e1> is -1 (seconds, 0 or more)": ["record 1 (-0n3pnCXNYk)"],
        "bad time: meta.token <e1> is 60.0 s, past the clip's duration 54.2 s": ["record 2 (-0n3pnCXNYk)"],
        "bad time: -0n3pnCXNYk ends at 129.8 s, not after its start 184.0 s": ["record 3 (-0n3pnCXNYk)"],
        "no id (it names the video)": ["record 4"]}


# ---------------------------------------------------------------- temporal grounding

CHARADES = {"AO8RW": {"duration": 33.75, "timestamps": [[0.0, 6.9], [5.3, 12.1]],
                      "sentences": ["a person is putting a book on a shelf.", "person opens the door."]},
            "Y6R7T": {"duration": 20.0, "timestamps": [[3.0, 1.0]], "sentences": ["someone sits."]}}


def test_a_charades_dict_gives_a_grounding_sample_per_sentence_or_a_captioning_sample_per_video(tmp_path):
    touch(tmp_path / "Charades_v1", "AO8RW.mp4", "Y6R7T.mp4")
    data = write(tmp_path, "charades_sta_train.json", CHARADES)
    records, skipped = read(data, media_dir=tmp_path / "Charades_v1", check_files=True)
    assert records == [
        ("AO8RW#0", [("user", '<video>During which time segment does "a person is putting a book on a shelf" happen? '
                              'Format strictly: From xx to xx.'), ("assistant", "From 0.0 to 6.9.")], ["AO8RW"]),
        ("AO8RW#1", [("user", '<video>During which time segment does "person opens the door" happen? Format '
                              'strictly: From xx to xx.'), ("assistant", "From 5.3 to 12.1.")], ["AO8RW"]),
    ]
    assert skipped == {f"{data}: bad time: timestamps[0] ends at 1.0 s, not after its start 3.0 s": ["Y6R7T#0"]}
    records, _ = read(data, prompt="When does {sentence} happen?")
    assert records[1][1][0] == ("user", "<video>When does person opens the door happen?")
    records, _ = read(data, task="captions", prompt="Describe the events.")
    answer = "From 0.0 to 6.9, a person is putting a book on a shelf. From 5.3 to 12.1, person opens the door."
    assert records == [("AO8RW", [("user", "<video>Describe the events."), ("assistant", answer)], ["AO8RW"])]


def test_a_time_r1_list_gives_a_grounding_sample_over_its_window(tmp_path):
    touch(tmp_path, "activitynet/v_x.mp4")
    data = write(tmp_path, "train_2k5.json", [
        {"video": "activitynet/v_x.mp4", "duration": 40.0, "timestamp": [2.5, 10.0], "sentence": "a man waves.",
         "video_start": 100.0, "video_end": 140.0},
        {"video": "activitynet/v_x.mp4", "duration": 40.0, "timestamp": [2.5], "sentence": "a man waves."},
    ])
    records, skipped = read(data, check_files=True)
    assert records == [("#0", [("user", '<video>During which time segment does "a man waves" happen? Format strictly: '
                                        'From xx to xx.'), ("assistant", "From 2.5 to 10.0.")],
                        ["activitynet/v_x#t=100,140"])]
    assert list(skipped.values()) == [["record 1"]] and "bad time: timestamp is [2.5]" in next(iter(skipped))


# ---------------------------------------------------------------- the same conversation in every format

def same_conversation(folder: Path, videos: Path) -> dict[str, tuple[Path, dict]]:
    """One conversation over video a (0–1.5 s "a square moves", 1.5–2 s "it stops"), written in each
    format as its docs write it: {format: (file, reader options)}."""
    question, answer = "What happens?", "From 0.0 to 1.5, a square moves. From 1.5 to 2.0, it stops."
    tokens = {"<s0>": 0, "<e0>": 1.5, "<s1>": 1.5, "<e1>": 2.0}
    chat = lambda role_key, text_key, user, assistant, q=f"<video>{question}": [
        {role_key: user, text_key: q}, {role_key: assistant, text_key: answer}]
    return {
        "qprep": (write(folder, "qprep.json", [{"id": "a", "conversations": chat("from", "value", "human", "gpt")}]),
                  {}),
        "llamafactory": (write(folder, "lf.json", [{"conversations": chat("from", "value", "human", "gpt"),
                                                    "videos": ["a.mp4"]}]), {"media_dir": videos}),
        "swift": (write(folder, "swift.jsonl", [{"messages": chat("role", "content", "user", "assistant", question),
                                                 "videos": [str(videos / "a.mp4")]}]), {"media_dir": videos}),
        "llava": (write(folder, "llava.json", [{"id": "a", "video": "a.mp4", "conversations": chat(
            "from", "value", "human", "gpt", f"<image>\n{question}")}]), {"media_dir": videos}),
        "blocks": (write(folder, "blocks.json", [{"messages": [
            {"role": "user", "content": [{"type": "video", "video": str(videos / "a.mp4")},
                                         {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]}]), {"media_dir": videos}),
        "longvale": (write(folder, "longvale.json", [{"id": "a", "meta": {"duration": 2.0, "token": tokens},
                                                      "conversations": [
            {"from": "human", "value": f"<video>\n{question}"},
            {"from": "gpt", "value": "From <s0> to <e0>, a square moves. From <s1> to <e1>, it stops."}]}]),
            {"media_dir": videos}),
        "grounding": (write(folder, "charades.json", {"a": {"duration": 2.0, "timestamps": [[0, 1.5], [1.5, 2]],
                                                            "sentences": ["a square moves.", "it stops."]}}),
                      {"media_dir": videos, "task": "captions", "prompt": question}),
    }


def train_dataset(store, records):
    model_dir, cache = store
    checkpoint = open_checkpoint(model_dir)
    tokenizer = checkpoint.tokenizer()
    return build_dataset(records, cache, tokenizer, checkpoint.family.prompt_layout(checkpoint, tokenizer))


def test_the_same_conversation_in_every_format_trains_on_the_same_tokens_and_labels(vl_train_store, tmp_path):
    videos = vl_train_store[1].store.root.parent / "videos"
    files = same_conversation(tmp_path, videos)
    built = {}
    for name, (path, options) in files.items():
        dataset = train_dataset(vl_train_store, load_records(DataFile(path, check_files=True, **options)))
        assert len(dataset.samples) == 1 and not dataset.skipped, (name, dataset.report())
        sample = dataset.samples[0]
        built[name] = (sample.input_ids, sample.labels, sample.media)
    assert all(value == built["qprep"] for value in built.values()), \
        [name for name, value in built.items() if value != built["qprep"]]
    assert built["qprep"][2] == ("a",) and any(label != IGNORE for label in built["qprep"][1])


def test_two_videos_in_every_format_that_takes_several_train_alike(vl_train_store, tmp_path):
    videos = vl_train_store[1].store.root.parent / "videos"
    turns = lambda q: [{"from": "human", "value": q}, {"from": "gpt", "value": "The second is longer."}]
    swift_turns = [{"role": "user", "content": "Compare <video> with <video>."},
                   {"role": "assistant", "content": "The second is longer."}]
    block = lambda name: {"type": "video", "video": name}
    text = lambda t: {"type": "text", "text": t}
    files = {
        "qprep": write(tmp_path, "q.json", [{"id": "pair", "media": ["a", "b"],
                                              "conversations": turns("Compare <video> with <video>.")}]),
        "llamafactory": write(tmp_path, "lf.json", [{"conversations": turns("Compare <video> with <video>."),
                                                     "videos": ["a.mp4", "b.mp4"]}]),
        "swift": write(tmp_path, "s.jsonl", [{"messages": swift_turns, "videos": ["a.mp4", "b.mp4"]}]),
        "llava": write(tmp_path, "l.json", [{"id": "pair", "video": ["a.mp4", "b.mp4"],
                                             "conversations": turns("Compare <image> with <image>.")}]),
        "blocks": write(tmp_path, "b.json", [{"messages": [
            {"role": "user", "content": [text("Compare "), block("a.mp4"), text(" with "), block("b.mp4"), text(".")]},
            {"role": "assistant", "content": "The second is longer."}]}]),
    }
    built = {}
    for name, path in files.items():
        dataset = train_dataset(vl_train_store, load_records(path, media_dir=videos))
        assert len(dataset.samples) == 1, (name, dataset.report())
        built[name] = (dataset.samples[0].input_ids, dataset.samples[0].labels, dataset.samples[0].media)
    assert all(value == built["qprep"] for value in built.values())
    assert built["qprep"][2] == ("a", "b")


def test_unusable_records_are_reported_before_training_and_the_rest_train(vl_train_store, tmp_path):
    """A record without an answer (it trained on a 0/0 loss) is left out like the reader's errors, each
    reason naming the file; windows and images the store does not hold are read and left out as such."""
    videos = vl_train_store[1].store.root.parent / "videos"
    data = write(tmp_path, "mixed.jsonl", [
        {"messages": [{"role": "user", "content": "What happens?"}, {"role": "assistant", "content": "A."}],
         "videos": ["a.mp4"]},
        {"messages": [{"role": "user", "content": "What happens?"}], "videos": ["b.mp4"]},        # no answer
        {"messages": [{"role": "user", "content": "<video><video>?"}, {"role": "assistant", "content": "A."}],
         "videos": ["b.mp4"]},                                                                    # two tags, one video
        {"messages": [{"role": "user", "content": "What?"}, {"role": "assistant", "content": "A."}],
         "images": ["cat.jpg"]},                                                                  # not in this store
    ])
    dataset = train_dataset(vl_train_store, load_records(data, media_dir=videos))
    assert [s.media for s in dataset.samples] == [("a",)]
    assert dataset.skipped == {f"{data}: 2 <video> tags for 1 video": ["record 2"],
                               "video not in the cache": ["#3"], "no assistant answer to learn": ["#1"]}
    report = dataset.report()
    assert f"left out 1: {data}: 2 <video> tags for 1 video (record 2)" in report
    # qprep's own records: one without an answer is left out too (it trained with loss NaN)
    plain = write(tmp_path, "plain.json", [{"id": "a", "conversations": [{"from": "human", "value": "<video>?"}]},
                                           {"id": "b", "conversations": [{"from": "human", "value": "<video>?"},
                                                                         {"from": "gpt", "value": "B."}]}])
    dataset = train_dataset(vl_train_store, load_records(plain))
    assert [s.id for s in dataset.samples] == ["b"] and dataset.skipped == {"no assistant answer to learn": ["a"]}


def test_infer_reads_any_format_and_reports_what_it_leaves_out(vl_train_store, tmp_path):
    model_dir, cache = vl_train_store
    videos = cache.store.root.parent / "videos"
    data = write(tmp_path, "charades.json", {"a": {"duration": 2.0, "timestamps": [[0, 1.5]], "sentences": ["x."]},
                                             "b": {"duration": 3.0, "timestamps": [[2, 1]], "sentences": ["y."]}})
    requests, skipped = choose_requests(cache, data=DataFile(data, media_dir=videos))
    assert [(r.id, r.media, r.conversation[-1]["role"]) for r in requests] == [("a#0", ("a",), "user")]
    assert list(skipped.values()) == [["b#0"]] and next(iter(skipped)).startswith(f"{data}: bad time")


def test_cli_train_and_infer_take_the_format_and_media_folder(vl_train_store, tmp_path):
    model_dir, cache = vl_train_store
    videos = cache.store.root.parent / "videos"
    path, _ = same_conversation(tmp_path, videos)["llava"]
    out = tmp_path / "answers.jsonl"
    common = ["--cache", str(cache.store.root), "--model", model_dir, "--data", str(path), "--format", "llava",
              "--media-dir", str(videos)]
    result = CliRunner().invoke(main, ["infer", *common, "--out", str(out), "--max-new-tokens", "2", "--quiet"])
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["a"]
    result = CliRunner().invoke(main, ["infer", *common[:-4], "--format", "swift", "--out", str(out), "--quiet"])
    # read as ms-swift, its <image> tag names no image: nothing left to answer
    assert result.exit_code == 3 and "no video to answer" in result.output


def test_a_parquet_file_its_entry_names_and_a_data_file_every_rank_can_take(tmp_path):
    import pickle

    import pyarrow as pa
    import pyarrow.parquet as pq

    touch(tmp_path, "clips/a.mp4")
    pq.write_table(pa.Table.from_pylist([{"conversations": [{"from": "human", "value": "<video>What?"},
                                                             {"from": "gpt", "value": "A."}],
                                          "videos": ["clips/a.mp4"]}]), tmp_path / "train-00000.parquet")
    write(tmp_path, "dataset_info.json", {"clips": {"file_name": "train-00000.parquet",
                                                    "columns": {"messages": "conversations", "videos": "videos"},
                                                    "formatting": "sharegpt"}})
    source = DataFile(tmp_path / "dataset_info.json", check_files=True)
    assert pickle.loads(pickle.dumps(source)) == source and str(source) == str(tmp_path / "dataset_info.json")
    records, skipped = read(tmp_path / "dataset_info.json", check_files=True)
    assert records == [("#0", [("user", "<video>What?"), ("assistant", "A.")], ["clips/a"])] and skipped == {}
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": []}\n{not json\n')
    with pytest.raises(SettingsError, match="broken.jsonl: line 2 is not JSON"):
        load(DataFile(broken))


def test_cli_train_on_a_longvale_file_reports_its_left_out_records_and_trains_the_rest(vl_train_store, tmp_path):
    model_dir, cache = vl_train_store
    videos = cache.store.root.parent / "videos"
    record = lambda video_id, token: {"id": video_id, "meta": {"duration": 2.0, "token": token}, "conversations": [
        {"from": "human", "value": "<video>\nWhat happens?"}, {"from": "gpt", "value": "From <s0> to <e0>, it moves."}]}
    data = write(tmp_path, "longvale.json", [record("a", {"<s0>": 0, "<e0>": 1.5}), record("b", {"<s0>": 0}),
                                             record("gone", {"<s0>": 0, "<e0>": 1})])
    result = CliRunner().invoke(main, [
        "train", "--cache", str(cache.store.root), "--data", str(data), "--media-dir", str(videos), "--model", model_dir,
        "--out", str(tmp_path / "run"), "--epochs", "1", "--grad-accum", "1", "--workers", "0", "--quiet"])
    assert result.exit_code == 0, result.output
    assert "1 samples" in result.output
    assert f"left out 1: {data}: bad time: <e0> has no time in meta.token (record 1 (b))" in result.output
    assert f"left out 1: {data}: missing file: gone (looked for {videos / 'gone'}{{" in result.output
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
