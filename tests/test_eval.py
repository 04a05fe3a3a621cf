"""`qprep eval`: answers parsed leniently into timed segments (and every unread line reported), the
ActivityNet dense-captioning evaluator's temporal metrics on a hand-worked example, and caption
metrics equal to pycocoevalcap's own scorers called directly on the same pairs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
from click.testing import CliRunner

from qprep.cli import main
from qprep.eval import captions, temporal
from qprep.eval.score import evaluate
from qprep.eval.segments import Segment, parse_answer

# answer → the segments it holds (start, end, caption); broken ones hold fewer or none
STYLES = [
    ("From 0 to 4.5, a man talks.", [(0, 4.5, "a man talks")]),
    ("From 0.0s to 4.5s: a man talks.", [(0, 4.5, "a man talks")]),
    ("From 0.0 seconds to 4.5 seconds, a man talks", [(0, 4.5, "a man talks")]),
    ("0.0 - 4.5 seconds, a man talks.", [(0, 4.5, "a man talks")]),
    ("0 – 4.5: a man talks", [(0, 4.5, "a man talks")]),
    ("[0, 4.5] a man talks", [(0, 4.5, "a man talks")]),
    ("(0.0-4.5) a man talks.", [(0, 4.5, "a man talks")]),
    ("<0 - 4.5> a man talks", [(0, 4.5, "a man talks")]),
    ("Between 0 and 4.5, a man talks.", [(0, 4.5, "a man talks")]),
    ("from 00:12 to 01:05, music plays", [(12, 65, "music plays")]),
    ("From 1:00:00 to 1:00:30.5, credits roll.", [(3600, 3630.5, "credits roll")]),
    ("From 9 to 4.5, reversed.", [(4.5, 9, "reversed")]),
    ("From 0 to 4.5, a man talks. From 4.5 to 9, he leaves.", [(0, 4.5, "a man talks"), (4.5, 9, "he leaves")]),
    ("From 0 to 2, one.From 2 to 4, two.", [(0, 2, "one"), (2, 4, "two")]),
    ("Events:\n1. 0-4 a cat sits\n2. 4-8 a dog runs", [(0, 4, "a cat sits"), (4, 8, "a dog runs")]),
    ("- 0 to 2: one\n- 2 to 4: two", [(0, 2, "one"), (2, 4, "two")]),
    ("From 0 to 5, 2 to 3 people dance.", [(0, 5, "2 to 3 people dance")]),  # numbers inside a caption
    ("From 0 to 4.5, 5 dogs run.", [(0, 4.5, "5 dogs run")]),
    ("From 0 to 4.5, a man\ntalks for a while.", [(0, 4.5, "a man talks for a while")]),
    ("From 0 to 3.", [(0, 3, "")]),  # a range without a caption is still a segment
    ("FROM 2 TO 6, LOUD NOISE.", [(2, 6, "LOUD NOISE")]),
    ("From 0 to , a man talks.", []),  # broken: no end
    ("a man talks, then leaves", []),  # no time at all
    ("", []),
    ("From zero to five, a man talks.", []),  # words, not numbers
    ("The count is 4.5, 5 and 6.", []),  # numbers in a sentence are not a range
]


@pytest.mark.parametrize(("answer", "expected"), STYLES)
def test_an_answer_in_any_common_style_gives_its_segments(answer, expected):
    parsed = parse_answer(answer)
    assert [(s.start, s.end, s.text) for s in parsed.segments] == [(float(a), float(b), t) for a, b, t in expected]


def test_lines_without_a_time_range_are_listed_and_reversed_ranges_counted():
    parsed = parse_answer("Sure, here are the events:\nFrom 4 to 2, a bell.\nI hope this helps\n\nFrom 5 to 6, end.")
    assert parsed.unparsed == ["Sure, here are the events:", "I hope this helps"]
    assert parsed.reversed == 1 and len(parsed.segments) == 2
    assert parse_answer("nothing timed").empty and parse_answer("nothing timed").unparsed == ["nothing timed"]


def test_tiou_is_the_evaluators():
    """intersection / (union + 1e-8); apart, the union is the two lengths' sum (not the hull)."""
    assert temporal.tiou(Segment(0, 4, ""), Segment(2, 6, "")) == pytest.approx(2 / 6)
    assert temporal.tiou(Segment(0, 2, ""), Segment(4, 6, "")) == 0.0
    assert temporal.tiou(Segment(0, 4, ""), Segment(0, 4, "")) == pytest.approx(1 - 2.5e-9)
    assert temporal.tiou(Segment(3, 3, ""), Segment(3, 3, "")) == 0.0


def write(tmp_path, truth: dict, answers: list) -> tuple:
    data = [{"id": video_id, "conversations": [{"from": "human", "value": "<video> what happens?"},
                                                {"from": "gpt", "value": text}]} for video_id, text in truth.items()]
    (tmp_path / "test.json").write_text(json.dumps(data))
    (tmp_path / "answers.jsonl").write_text("\n".join(a if isinstance(a, str) else json.dumps(a) for a in answers))
    return tmp_path / "answers.jsonl", tmp_path / "test.json"


# A hand-worked example. v1: true [0,10] [10,20]; predicted [0,8] (tIoU 0.8 with [0,10]), [12,30]
# (tIoU 8/20 = 0.4 with [10,20]) and [40,50] (none). v2: true [0,5]; predicted [1,5] (tIoU 0.8).
# v3: no answer.
#   tIoU > 0.3: v1 P 2/3 R 2/2, v2 P 1 R 1, v3 0 0 -> P = (2/3 + 1 + 0)/3 = 5/9, R = 2/3
#   tIoU > 0.5: v1 P 1/3 R 1/2, v2 1 1, v3 0 0     -> P = 4/9, R = 1/2
#   tIoU > 0.7: the same as 0.5                     -> P = 4/9, R = 1/2
#   tIoU > 0.9: nothing                             -> P = R = 0
# mean best tIoU: v1 (0.8 + 0.4)/2 = 0.6, v2 0.8, v3 0 -> 1.4/3
HAND = ({"v1": "From 0 to 10, a man walks in. From 10 to 20, he sits down.",
         "v2": "From 0 to 5, a dog barks loudly.",
         "v3": "From 2 to 4, rain falls."},
        [{"id": "v1", "answer": "From 0 to 8, a man walks in. From 12 to 30, he sits. From 40 to 50, a bird."},
         {"id": "v2", "answer": "From 1 to 5, a dog barks."}])


def test_precision_and_recall_at_each_threshold_on_a_hand_worked_example(tmp_path):
    report = evaluate(*write(tmp_path, *HAND), captions=False)
    expected = {0.3: (5 / 9, 2 / 3), 0.5: (4 / 9, 1 / 2), 0.7: (4 / 9, 1 / 2), 0.9: (0.0, 0.0)}
    for tiou, (precision, recall) in expected.items():
        assert report.precision[tiou] == pytest.approx(precision) and report.recall[tiou] == pytest.approx(recall)
        assert report.f1[tiou] == pytest.approx(0 if not precision else 2 * precision * recall / (precision + recall))
    assert report.mean(report.precision) == pytest.approx((5 / 9 + 4 / 9 + 4 / 9) / 4)
    assert report.best_tiou == pytest.approx(1.4 / 3, abs=1e-7)
    assert report.problems == [f"{tmp_path / 'answers.jsonl'}: no answer for 'v3' (scored 0)"]


def test_bleu_and_cider_equal_pycocoevalcap_called_directly_on_the_same_pairs(tmp_path):
    """Captions written lower case without punctuation, so that any tokenizer leaves them as they are,
    and the pairs the evaluator's rule makes written out by hand."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    truth = {"v1": "From 0 to 10, a man walks into the room. From 10 to 20, he sits down on a chair.",
             "v2": "From 0 to 5, a small dog barks at the door. From 5 to 9, the dog runs away."}
    answers = [{"id": "v1", "answer": "From 0 to 9, a man walks into a room. From 9 to 20, a man sits on the chair. "
                                      "From 25 to 30, a bird sings."},
               {"id": "v2", "answer": "From 0 to 9, a dog barks and runs away."}]
    report = evaluate(*write(tmp_path, truth, answers), meteor=False)
    no_match = "abc123"  # the evaluator's 'abc123!@#', punctuation dropped by the tokenizer
    pairs = {  # tIoU → video → (predicted, true) pairs; v2's prediction [0,9] covers [0,5] 5/9 and [5,9] 4/9
        0.3: {"v1": [("a man walks into a room", "a man walks into the room"),
                     ("a man sits on the chair", "he sits down on a chair"), ("a bird sings", no_match)],
              "v2": [("a dog barks and runs away", "a small dog barks at the door"),
                     ("a dog barks and runs away", "the dog runs away")]},
        0.5: {"v1": [("a man walks into a room", "a man walks into the room"),
                     ("a man sits on the chair", "he sits down on a chair"), ("a bird sings", no_match)],
              "v2": [("a dog barks and runs away", "a small dog barks at the door")]},
        0.7: {"v1": [("a man walks into a room", "a man walks into the room"),
                     ("a man sits on the chair", "he sits down on a chair"), ("a bird sings", no_match)],
              "v2": [("a dog barks and runs away", no_match)]},
        0.9: {"v1": [("a man walks into a room", no_match),  # 9 / (10 + 1e-8) falls short of 0.9
                     ("a man sits on the chair", "he sits down on a chair"), ("a bird sings", no_match)],
              "v2": [("a dog barks and runs away", no_match)]},
    }
    for tiou, videos in pairs.items():
        for video_id, video_pairs in videos.items():
            res = {i: [p] for i, (p, _) in enumerate(video_pairs)}
            gts = {i: [t] for i, (_, t) in enumerate(video_pairs)}
            with contextlib.redirect_stdout(io.StringIO()):
                bleu, _ = Bleu(4).compute_score(gts, res)
            cider, _ = Cider().compute_score(gts, res)
            video = next(v for v in report.videos if v.id == video_id)
            assert video.captions["BLEU-4"][tiou] == bleu[3], (tiou, video_id)
            assert video.captions["CIDEr"][tiou] == cider, (tiou, video_id)
        for name in ("BLEU-4", "CIDEr"):
            assert report.captions[name][tiou] == sum(v.captions[name][tiou] for v in report.videos) / 2
    assert report.captions["BLEU-4"][0.3] > 0.1 and "METEOR" not in report.captions


def test_without_java_meteor_is_left_out_and_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    report = evaluate(*write(tmp_path, *HAND))
    assert set(report.captions) == {"BLEU-4", "CIDEr"}
    assert any("METEOR left out: no Java runtime" in note for note in report.notes)
    assert report.tokenizer.startswith("qprep's plain tokenizer")


def test_bad_input_is_reported_with_file_and_line_and_the_rest_scored(tmp_path):
    answers = [{"id": "v1", "answer": "From 0 to 8, a man walks in."}, "this is not json",
               {"id": "v1", "answer": "From 0 to 1, again."}, {"id": "v2", "answer": "   "},
               {"id": "v9", "answer": "From 0 to 1, x."}, {"answer": "no id"},
               {"id": "v3", "answer": "I cannot tell."}]
    path, data = write(tmp_path, HAND[0], answers)
    report = evaluate(path, data, captions=False)
    assert report.problems == [
        f"{path}:2: not a JSON line (Expecting value)",
        f"{path}:3: id 'v1' again (line 1 counts)",
        f"{path}:6: expected {{\"id\": ..., \"answer\": \"...\"}}",
        f"{path}:5: id 'v9' is not in {data}; not scored",
        f"{path}:4: the answer for 'v2' is empty (scored 0)",
        f"{path}:7: no time range in the answer for 'v3' (scored 0)",
    ]
    assert [v.id for v in report.videos] == ["v1", "v2", "v3"] and report.precision[0.5] == pytest.approx(1 / 3)
    (tmp_path / "empty.jsonl").write_text("{not json\n")
    result = CliRunner().invoke(main, ["eval", "--answers", str(tmp_path / "empty.jsonl"), "--data", str(data)])
    assert result.exit_code == 3 and "no usable answer line" in result.output and "empty.jsonl" in result.output


def test_the_timeline_figure_shows_true_and_predicted_segments_with_their_captions(tmp_path):
    from qprep.eval.report import timeline_figure

    report = evaluate(*write(tmp_path, *HAND), captions=False)
    figure = timeline_figure(report, videos=2)
    assert len(figure.axes) == 2
    for axes, video in zip(figure.axes, report.videos):
        assert axes.get_title(loc="left").startswith(video.id) and "P@0.5" in axes.get_title(loc="left")
        assert [t.get_text() for t in axes.get_yticklabels()] == ["predicted", "true"]
        assert axes.get_xlabel() == "seconds"
        bars = {bars.get_label(): bars.get_paths() for bars in axes.collections}
        assert (len(bars["predicted"]), len(bars["true"])) == (len(video.predicted), len(video.truth))
        assert [t.get_text() for t in axes.texts] == [s.text for s in video.predicted + video.truth]
    assert figure.axes[0].get_xlim()[1] >= 50  # v1's last prediction ends at 50 s


def test_cli_prints_the_table_json_and_draws_the_timelines(tmp_path):
    path, data = write(tmp_path, *HAND)
    base = ["eval", "--answers", str(path), "--data", str(data), "--no-captions"]
    result = CliRunner().invoke(main, base + ["--per-video", "--plot", str(tmp_path / "eval.png")])
    assert result.exit_code == 0, result.output
    assert "precision" in result.output and "v3" in result.output and "(no answer)" in result.output
    assert f"picture of 3 videos → {tmp_path / 'eval.png'}" in result.output
    assert (tmp_path / "eval.png").stat().st_size > 10_000
    report = json.loads(CliRunner().invoke(main, base + ["--json"]).output)
    assert report["precision"]["0.3"] == pytest.approx(5 / 9) and report["answered"] == 2
    assert [v["id"] for v in report["per_video"]] == ["v1", "v2", "v3"]


# Grounding: a Charades-STA-style annotation dict, one query per sentence, answers keyed {video_id}#{i}.
# IoU by hand (hull union): A#0 the same range → 1; A#1 [25,30] against [10,20] → 0; B#0 [5,15] against
# [0,10] → 5/15 = 1/3 (each half covered); B#1..B#4 [0,3], [0,5], [0,7], [0,6.99] against [0,10] → 0.3,
# 0.5, 0.7 and 0.699, at and just below the thresholds; B#5 unanswered → 0.
CHARADES = {"A": {"duration": 33.75, "timestamps": [[0.0, 6.9], [10, 20]],
                  "sentences": ["a person is putting a book on a shelf.", "person opens the door."]},
            "B": {"duration": 30.0, "timestamps": [[0, 10]] * 6, "sentences": [f"event {i}" for i in range(6)]}}
GROUNDED = [{"id": "A#0", "answer": "From 0.0 to 6.9."}, {"id": "A#1", "answer": "From 25 to 30."},
            {"id": "B#0", "answer": "From 5 to 15."}, {"id": "B#1", "answer": "From 0 to 3, or maybe from 0 to 10."},
            {"id": "B#2", "answer": "<think>from 9 to 10?</think> <answer>0 to 5</answer>"},
            {"id": "B#3", "answer": "From 0 to 7."}, {"id": "B#4", "answer": "From 0 to 6.99."}]
GROUNDED_IOUS = [1.0, 0.0, 1 / 3, 0.3, 0.5, 0.7, 0.699, 0.0]


def write_annotations(tmp_path, truth: dict, answers: list) -> tuple:
    (tmp_path / "annotations.json").write_text(json.dumps(truth))
    (tmp_path / "answers.jsonl").write_text("\n".join(json.dumps(a) for a in answers))
    return tmp_path / "answers.jsonl", tmp_path / "annotations.json"


def test_grounding_iou_is_one_when_perfect_zero_when_disjoint_and_a_third_for_half_overlaps():
    from qprep.eval.grounding import iou

    assert iou(Segment(0, 6.9, ""), Segment(0, 6.9, "")) == 1.0  # no 1e-8: a perfect range scores 1
    assert iou(Segment(25, 30, ""), Segment(10, 20, "")) == 0.0
    assert iou(Segment(20, 30, ""), Segment(10, 20, "")) == 0.0  # touching is not overlapping
    assert iou(Segment(5, 15, ""), Segment(0, 10, "")) == pytest.approx(1 / 3)
    assert iou(Segment(3, 3, ""), Segment(3, 3, "")) == 0.0  # a zero union


def test_grounding_r1_at_each_threshold_and_miou_on_hand_made_answers(tmp_path):
    report = evaluate(*write_annotations(tmp_path, CHARADES, GROUNDED))
    assert report.tasks == ("grounding",) and report.videos == []  # no dense captions were answered
    queries = report.grounding.queries
    assert [q.id for q in queries] == ["A#0", "A#1"] + [f"B#{i}" for i in range(6)]
    assert [q.iou for q in queries] == pytest.approx(GROUNDED_IOUS)
    assert (queries[3].predicted.start, queries[3].predicted.end) == (0, 3)  # the first range is the prediction
    assert (queries[4].predicted.start, queries[4].predicted.end) == (0, 5)  # Time-R1's last <answer> block
    assert report.grounding.metrics() == pytest.approx({  # IoU >= m: 0.3, 0.5 and 0.7 exactly count
        "R1@0.3": 6 / 8, "R1@0.5": 4 / 8, "R1@0.7": 2 / 8, "mIoU": sum(GROUNDED_IOUS) / 8})
    assert report.problems == [f"{tmp_path / 'answers.jsonl'}: no answer for 'B#5' (scored 0)"]


def test_grounding_json_names_the_metrics_as_charades_sta_reports_them(tmp_path):
    path, data = write_annotations(tmp_path, CHARADES, GROUNDED[:1] + [{"id": "A#7", "answer": "From 1 to 2."}])
    result = CliRunner().invoke(main, ["eval", "--answers", str(path), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    grounding = json.loads(result.output)["grounding"]
    assert {key: grounding[key] for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU")} == pytest.approx(
        {"R1@0.3": 1 / 8, "R1@0.5": 1 / 8, "R1@0.7": 1 / 8, "mIoU": 1 / 8})
    assert grounding["queries"] == 8 and grounding["answered"] == 1
    assert grounding["per_query"][0] == {"id": "A#0", "video": "A", "query": 0, "answered": True, "iou": 1.0,
                                         "sentence": CHARADES["A"]["sentences"][0], "truth": [0.0, 6.9],
                                         "predicted": [0.0, 6.9]}
    assert any("'A' has 2 sentences" in p and "no query 7" in p for p in json.loads(result.output)["problems"])
    text = CliRunner().invoke(main, ["eval", "--answers", str(path), "--data", str(data), "--per-video"]).output
    assert "grounding: 8 queries" in text and "R1@0.5 0.1250" in text and "mIoU 0.1250" in text


def test_task_forced_scores_one_kind_and_says_what_it_left(tmp_path):
    answers = GROUNDED + [{"id": "A", "answer": "From 0 to 6.9, a person puts a book on a shelf."}]
    path, data = write_annotations(tmp_path, CHARADES, answers)
    both = evaluate(path, data, captions=False)
    assert both.tasks == ("captioning", "grounding") and both.videos[0].recall[0.5] == 0.5
    only = evaluate(path, data, captions=False, task="captioning")
    assert only.grounding is None and f"{path}: 7 grounding answers not scored (--task captioning)" in only.problems
    only = evaluate(path, data, task="grounding")
    assert only.videos == [] and f"{path}: 1 captioning answers not scored (--task grounding)" in only.problems


def test_relative_units_are_read_as_longvale_reads_them(tmp_path):
    """Hundredths of the duration (50 s): a dense caption's "From 10 to 19" is 5 s to (19 + 1)·0.5 = 10 s
    (`metric.py` adds 1 to the end), a grounding answer's "From 10 to 20" is 5 s to 10 s (`eval.py`
    does not)."""
    truth = {"v": {"duration": 50.0, "timestamps": [[5, 10], [10, 20]], "sentences": ["a man talks", "he leaves"]},
             "no_duration": {"timestamps": [[0, 1]], "sentences": ["x"]}}
    answers = [{"id": "v", "answer": "From 10 to 19, a man talks.\nFrom 20 to 39, he leaves."},
               {"id": "v#0", "answer": "From 10 to 20."}, {"id": "v#1", "answer": "From 20 to 40."},
               {"id": "no_duration", "answer": "From 0 to 50, x."}]
    path, data = write_annotations(tmp_path, truth, answers)
    report = evaluate(path, data, captions=False, units="relative")
    assert [(s.start, s.end) for s in report.videos[0].predicted] == [(5, 10), (10, 20)]
    assert report.videos[0].precision[0.9] == 1 and report.videos[1].predicted == []
    assert [q.iou for q in report.grounding.queries[:2]] == [1.0, 1.0]
    assert (f"{path}:4: 'no_duration' has no duration in the data, so its answer in relative units cannot be "
            "read (scored 0)") in report.problems
    seconds = evaluate(path, data, captions=False)  # the same answers read as seconds
    assert [(s.start, s.end) for s in seconds.videos[0].predicted] == [(10, 19), (20, 39)]
    del truth["v"]["duration"]
    path, data = write_annotations(tmp_path, {"v": truth["v"]}, answers[:1])
    result = CliRunner().invoke(main, ["eval", "--answers", str(path), "--data", str(data), "--units", "relative"])
    assert result.exit_code == 3 and f"--data {data}: no record gives a duration" in result.output


def test_truth_is_read_from_annotation_dicts_and_longvale_records_and_bad_records_are_named(tmp_path):
    from qprep.errors import SettingsError
    from qprep.eval.truth import load_truth

    annotations = {"AO8RW": {"duration": 33.75, "timestamps": [[6.9, 0.0], [3, 9.5]], "sentences": ["a", "b"]},
                   "short": {"duration": 10, "timestamps": [[0, 1]], "sentences": ["a", "b"]},
                   "bad": {"duration": 10, "timestamps": [[0, "x"]], "sentences": ["a"]}}
    (tmp_path / "charades.json").write_text(json.dumps(annotations))
    problems: list[str] = []
    truth = load_truth(tmp_path / "charades.json", problems)
    assert list(truth) == ["AO8RW"] and truth["AO8RW"].duration == 33.75
    assert [(s.start, s.end, s.text) for s in truth["AO8RW"].segments] == [(0, 6.9, "a"), (3, 9.5, "b")]  # file order
    # the grounding reader's own checks and words (qprep.datasets.grounding)
    assert problems == [f"{tmp_path / 'charades.json'}: record 1 (short): timestamps and sentences must be lists of "
                        "one length; not scored",
                        f"{tmp_path / 'charades.json'}: record 2 (bad): bad time: timestamps[0]'s end is 'x' (seconds, "
                        "0 or more); not scored"]

    longvale = [{"id": "clip", "meta": {"duration": 54.2, "split": [129.8, 184.0],
                                        "token": {"<s0>": 0, "<e0>": 9.4, "<s1>": 49.4, "<e1>": 53.2}},
                 "conversations": [{"from": "human", "value": "<video>\nCould you detail events?"},
                                   {"from": "gpt", "value": "From <s0> to <e0>, woman is counting money. "
                                                            "From <s1> to <e1>, she leaves."}]},
                {"id": "tokenless", "conversations": [{"from": "human", "value": "<video>"},
                                                      {"from": "gpt", "value": "From <s0> to <e0>, a."}]},
                {"id": "plain", "conversations": [{"from": "human", "value": "<video>"},
                                                  {"from": "gpt", "value": "From 1 to 2, b."}]},
                {"id": "unasked", "conversations": [{"from": "gpt", "value": "From 1 to 2, b."}]}]
    (tmp_path / "longvale.json").write_text(json.dumps(longvale))
    problems = []
    truth = load_truth(tmp_path / "longvale.json", problems)
    assert [(s.start, s.end, s.text) for s in truth["clip"].segments] == [
        (0, 9.4, "woman is counting money"), (49.4, 53.2, "she leaves")]
    assert truth["clip"].duration == 54.2 and truth["plain"].duration is None
    assert truth["clip"].media == ("clip#t=129.8,184",)  # the window training reads
    assert problems == [f"{tmp_path / 'longvale.json'}: record 1 (tokenless): bad time: <s0> has no time in "
                        "meta.token; not scored", f"{tmp_path / 'longvale.json'}: record 3 (unasked): no user turn; "
                                                  "not scored"]

    listed = [{"id": "v_QOlSCBRmfWY", "duration": 82.73, "timestamps": [[0.83, 19.86], [17.37, 60.81]],
               "sentences": ["A young woman is seen standing in a room.", "She then begins to dance."]}]
    (tmp_path / "listed.json").write_text(json.dumps(listed))  # the same records as a list with ids
    truth = load_truth(tmp_path / "listed.json", [])
    assert [(s.start, s.end) for s in truth["v_QOlSCBRmfWY"].segments] == [(0.83, 19.86), (17.37, 60.81)]

    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SettingsError, match="broken.json: line 1 is not JSON"):
        load_truth(tmp_path / "broken.json", [])
    (tmp_path / "none.json").write_text(json.dumps({"x": {"timestamps": [], "sentences": []}}))
    with pytest.raises(SettingsError, match=r"none.json: no record with true segments .*\(x\): no timestamps"):
        load_truth(tmp_path / "none.json", [])


def test_soda_matching_is_the_best_order_preserving_one():
    """SODA's `chased_dp_assignment` (fujiso/SODA soda.py) on matrices worked by hand: rows are true
    events, columns predicted ones, both in time order; a matching may not cross."""
    from qprep.eval.soda import best_matching_total

    # (1,0) alone 0.7 beats (0,0)+(1,1) 0.6 and (0,1) 0.6; the crossing (0,1)+(1,0) = 1.3 is not allowed
    assert best_matching_total([[0.5, 0.6], [0.7, 0.1]]) == pytest.approx(0.7)
    # (0,1)+(2,2) = 1.4 beats (1,0)+(2,2) = 1.3 and the diagonal 0.8
    assert best_matching_total([[0.2, 0.9, 0.0], [0.8, 0.1, 0.0], [0.0, 0.0, 0.5]]) == pytest.approx(1.4)
    assert best_matching_total([[0.3, 0.4, 0.2]]) == pytest.approx(0.4)  # one true event, one match
    assert best_matching_total([]) == 0.0


def test_soda_c_weighs_each_match_by_tiou_times_the_caption_score_and_sorts_by_start():
    """A caption score given by hand (`meteor(true, predicted)`), so that the numbers are worked here:
    true [0,10] "a", [10,20] "b"; predicted [0,8] "a" and [10,20] "b", either list written out of
    order. Sorted by start: score = [[tIoU 0.8 × 1.0, 0 × 0.2], [0 × 0.2, tIoU 1 × 0.5]] → S = 0.8 +
    0.5; precision = recall = 1.3 / 2, F = 0.65. (Left unsorted, the two matches would cross and only
    0.8 would count.)"""
    from qprep.eval.soda import soda_c

    table = {("a", "a"): 1.0, ("b", "b"): 0.5, ("a", "b"): 0.2, ("b", "a"): 0.2}
    truth, predicted = [Segment(0, 10, "a"), Segment(10, 20, "b")], [Segment(0, 8, "a"), Segment(10, 20, "b")]
    for true_order, predicted_order in ((truth, predicted[::-1]), (truth[::-1], predicted)):
        result = soda_c(predicted_order, true_order, lambda g, p: table[g, p])
        assert (result.precision, result.recall, result.f1) == pytest.approx((0.65, 0.65, 0.65))
    truth = truth[::-1]
    result = soda_c([Segment(0, 20, "a")], truth, lambda g, p: table[g, p])  # one prediction, two true events
    assert result.precision == pytest.approx(0.5 * 1.0) and result.recall == pytest.approx(0.25)
    assert soda_c([], truth, lambda g, p: 1.0).f1 == 0.0


# Built by hand and scored by fujiso/SODA itself (soda.py `SODA.evaluate` with soda_type "c", METEOR,
# its ANETCaptions loaded as LongVALE's `eval_soda` loads it: one reference file, multi_reference off).
# Its per-video maxima: v1 0.66287452 (pairs (0,0) (1,1) (2,2)), v2 0.13335381 (the prediction matched
# to the *second* true event: tIoU 4/9 × METEOR 0.3000 beats 5/9 × 0.2210), v3 0.14153175 (the shorter
# prediction [20,30]: 1/3 × 0.4246 beats 2/3 × 0.1895). Its result: precision, recall, F below.
SODA_TRUTH = {
    "v1": {"duration": 60.0, "timestamps": [[10, 25], [0, 10], [25, 40]],
           "sentences": ["He sits down on a chair.", "A man walks into the room.", "He reads a book."]},
    "v2": {"duration": 10.0, "timestamps": [[0, 5], [5, 9]],
           "sentences": ["A small dog barks at the door.", "The dog runs away."]},
    "v3": {"duration": 30.0, "timestamps": [[0, 30]], "sentences": ["Rain falls on a street."]}}
SODA_ANSWERS = [
    {"id": "v1", "answer": "From 12 to 30, A man sits on a chair and reads. From 0 to 12, A man enters the room. "
                           "From 30 to 40, He reads a newspaper. From 41 to 50, The man leaves."},
    {"id": "v2", "answer": "From 0 to 9, A dog barks and runs away."},
    {"id": "v3", "answer": "From 0 to 20, It rains on the street. From 20 to 30, Rain falls."}]
SODA_EXPECTED = {"precision": 0.12327943752929675, "recall": 0.14305560945979356, "f1": 0.12421658631633979,
                 "per_video_f1": {"v1": 0.18939272000650903, "v2": 0.08890253783374942, "v3": 0.09435450110876091}}


@pytest.mark.skipif(not captions.java_available(), reason="METEOR needs a Java runtime")
def test_soda_c_equals_fujiso_soda_on_a_case_built_by_hand(tmp_path):
    """SODA's numbers for v1-v3; a fourth video, left unanswered, counts 0 in qprep's mean (as qprep's
    other metrics count it) where SODA leaves it out: qprep's mean is SODA's × 3/4."""
    truth = {**SODA_TRUTH, "v4": {"duration": 5.0, "timestamps": [[0, 5]], "sentences": ["Nobody answers."]}}
    report = evaluate(*write_annotations(tmp_path, truth, SODA_ANSWERS))
    assert {v.id: v.soda.f1 for v in report.videos} == pytest.approx({**SODA_EXPECTED["per_video_f1"], "v4": 0.0},
                                                                     abs=1e-12)
    scores = report.to_dict()  # what --json prints
    for name, key in (("f1", "SODA_c"), ("precision", "SODA_c_precision"), ("recall", "SODA_c_recall")):
        assert scores[key] == pytest.approx(SODA_EXPECTED[name] * 3 / 4, abs=1e-12)
    assert [v["SODA_c"] for v in scores["per_video"]][3] == 0.0 and "grounding" not in scores


def test_without_java_soda_c_is_left_out_and_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(captions.shutil, "which", lambda name: None)
    report = evaluate(*write_annotations(tmp_path, SODA_TRUTH, SODA_ANSWERS))
    assert report.soda is None and "SODA_c" not in report.to_dict()
    assert "SODA_c left out: it weighs matches by METEOR, which did not run" in report.notes


class _Cache:
    """What `grounding_requests` asks of a store: its ids extracted ok and which it holds."""

    def __init__(self, ok, failed=()):
        self._ok, self._all = list(ok), set(ok) | set(failed)

    def ids(self):
        return self._ok

    def __contains__(self, video_id):
        return video_id in self._all


def test_infer_asks_one_grounding_question_per_true_sentence_keyed_as_eval_reads_it(tmp_path):
    from qprep.errors import SettingsError
    from qprep.train.infer import grounding_requests

    truth = {**CHARADES, "C": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["x"]},
             "D": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["y"]}, "E": {"timestamps": [], "sentences": []}}
    (tmp_path / "charades.json").write_text(json.dumps(truth))
    requests, skipped = grounding_requests(_Cache(["A", "B"], failed=["D"]), tmp_path / "charades.json")
    assert [r.id for r in requests] == ["A#0", "A#1"] + [f"B#{i}" for i in range(6)]
    assert requests[0].media == ("A",) and [m["role"] for m in requests[0].conversation] == ["user"]
    question = requests[0].conversation[0]["content"][-1]["text"]
    # LongVALE's way with the sentence: lower case, without its final period
    assert "find a person is putting a book on a shelf taking place" in question and "in seconds" in question
    assert skipped == {"records without true segments": [f"{tmp_path / 'charades.json'}: record 4 (E): no "
                                                         "timestamps; not scored"],
                       "video not in the cache": ["C#0"], "video failed extraction": ["D#0"]}
    answers = tmp_path / "answers.jsonl"  # the ids it writes are the queries eval scores
    answers.write_text("\n".join(json.dumps({"id": r.id, "answer": "From 0 to 1."}) for r in requests))
    report = evaluate(answers, tmp_path / "charades.json", captions=False)
    assert report.tasks == ("grounding",) and sum(q.answered for q in report.grounding.queries) == 8
    requests, _ = grounding_requests(_Cache(["A"]), tmp_path / "charades.json", prompt="When: {sentence}?")
    assert requests[1].conversation[0]["content"][-1]["text"] == "When: person opens the door?"
    with pytest.raises(SettingsError, match="needs {sentence}"):
        grounding_requests(_Cache(["A"]), tmp_path / "charades.json", prompt="When?")
    with pytest.raises(SettingsError, match="--grounding asks about the sentences of --data"):
        grounding_requests(_Cache(["A"]), None)


def _grounding_files(tmp_path) -> dict:
    """CHARADES written as a Charades-STA dict, a Time-R1 list and a LLaMA-Factory sharegpt set with
    its dataset_info.json: one grounding sample per sentence, named as the dict's reader names it."""
    samples = [(f"{video}#{k}", video, stamp, sentence) for video, item in CHARADES.items()
               for k, (stamp, sentence) in enumerate(zip(item["timestamps"], item["sentences"]))]
    (tmp_path / "charades.json").write_text(json.dumps(CHARADES))
    (tmp_path / "time_r1.json").write_text(json.dumps([
        {"id": name, "video": f"{video}.mp4", "duration": CHARADES[video]["duration"], "timestamp": stamp,
         "sentence": sentence} for name, video, stamp, sentence in samples]))
    (tmp_path / "lf").mkdir()
    (tmp_path / "lf" / "grounding.json").write_text(json.dumps([
        {"id": name, "messages": [{"role": "user", "content": f"<video>When does {sentence} happen?"},
                                  {"role": "assistant", "content": f"From {stamp[0]} to {stamp[1]}."}],
         "videos": [f"{video}.mp4"]} for name, video, stamp, sentence in samples]))
    (tmp_path / "lf" / "dataset_info.json").write_text(json.dumps({"charades": {
        "file_name": "grounding.json", "formatting": "sharegpt",
        "columns": {"messages": "messages", "videos": "videos"},
        "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}}}))
    return {"grounding": tmp_path / "charades.json", "time-r1": tmp_path / "time_r1.json",
            "llamafactory": tmp_path / "lf" / "dataset_info.json"}


def _captioning_files(tmp_path) -> dict:
    """HAND's truth as LongVALE records (times in meta.token), an ms-swift JSONL, content blocks and LLaVA."""
    question = "Could you detail events during different time segments?"
    longvale = []
    for video, text in HAND[0].items():
        token, k = {}, 0
        for start, end in [(s.start, s.end) for s in parse_answer(text).segments]:
            token.update({f"<s{k}>": start, f"<e{k}>": end})
            text = text.replace(f"From {start:g} to {end:g}", f"From <s{k}> to <e{k}>", 1)
            k += 1
        longvale.append({"id": video, "meta": {"duration": 60.0, "token": token},
                         "conversations": [{"from": "human", "value": f"<video>\n{question}"},
                                           {"from": "gpt", "value": text}]})
    (tmp_path / "longvale.json").write_text(json.dumps(longvale))
    (tmp_path / "swift.jsonl").write_text("\n".join(json.dumps(
        {"id": video, "messages": [{"role": "user", "content": f"<video>{question}"},
                                   {"role": "assistant", "content": text}], "videos": [f"{video}.mp4"]})
        for video, text in HAND[0].items()))
    (tmp_path / "blocks.json").write_text(json.dumps([
        {"id": video, "messages": [{"role": "user", "content": [{"type": "video", "video": f"{video}.mp4"},
                                                                {"type": "text", "text": question}]},
                                   {"role": "assistant", "content": [{"type": "text", "text": text}]}]}
        for video, text in HAND[0].items()]))
    (tmp_path / "llava.json").write_text(json.dumps([
        {"id": video, "video": f"{video}.mp4", "conversations": [{"from": "human", "value": f"<image>\n{question}"},
                                                                 {"from": "gpt", "value": text}]}
        for video, text in HAND[0].items()]))
    return {fmt: tmp_path / name for fmt, name in (("longvale", "longvale.json"), ("swift", "swift.jsonl"),
                                                   ("blocks", "blocks.json"), ("llava", "llava.json"))}


def test_eval_reads_the_truth_from_every_format_through_the_dataset_readers_and_scores_it_alike(tmp_path):
    """The same truth written in each format gives the same scores; each record's truth is named as
    `qprep.datasets.load` (what `infer --data` answers under) names it."""
    from qprep.datasets import load
    from qprep.datasets.detect import detect
    from qprep.datasets.source import read_rows

    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(a) for a in GROUNDED))
    for fmt, data in _grounding_files(tmp_path).items():
        if fmt != "llamafactory":
            assert detect(read_rows(data)) == fmt
        assert {r["id"] for r in load(data)} == {f"A#{k}" for k in range(2)} | {f"B#{k}" for k in range(6)}
        report = evaluate(answers, data, captions=False)
        assert report.tasks == ("grounding",), fmt
        assert [q.iou for q in report.grounding.queries] == pytest.approx(GROUNDED_IOUS), fmt
        assert report.grounding.metrics() == pytest.approx({"R1@0.3": 6 / 8, "R1@0.5": 4 / 8, "R1@0.7": 2 / 8,
                                                            "mIoU": sum(GROUNDED_IOUS) / 8}), fmt

    answers.write_text("\n".join(json.dumps(a) for a in HAND[1]))
    expected = {0.3: (5 / 9, 2 / 3), 0.5: (4 / 9, 1 / 2), 0.7: (4 / 9, 1 / 2), 0.9: (0.0, 0.0)}
    for fmt, data in _captioning_files(tmp_path).items():
        assert detect(read_rows(data)) == fmt and [r["id"] for r in load(data)] == list(HAND[0])
        report = evaluate(answers, data, captions=False)
        assert report.tasks == ("captioning",) and [v.id for v in report.videos] == list(HAND[0]), fmt
        assert [report.precision[t] for t in expected] == pytest.approx([p for p, _ in expected.values()]), fmt
        assert [report.recall[t] for t in expected] == pytest.approx([r for _, r in expected.values()]), fmt
        assert report.best_tiou == pytest.approx(1.4 / 3), fmt
    # LongVALE's relative units: the duration comes from meta.duration (60 s): "From 0 to 13" is 0-8.4 s
    answers.write_text(json.dumps({"id": "v2", "answer": "From 0 to 7, a dog barks."}))
    report = evaluate(answers, tmp_path / "longvale.json", captions=False, units="relative")
    assert (report.videos[1].predicted[0].start, report.videos[1].predicted[0].end) == pytest.approx((0, 4.8))


def test_eval_takes_a_forced_format_and_a_dataset_mixing_dense_captions_and_grounding_samples(tmp_path):
    """One LLaMA-Factory file holding a dense-captioning record per video and a grounding record
    beside it: each answer is scored as its record's kind, the grounding records are the queries."""
    records = [{"id": "v1", "messages": [{"role": "user", "content": "<video>What happens?"},
                                         {"role": "assistant", "content": HAND[0]["v1"]}], "videos": ["v1.mp4"]},
               {"id": "v1#0", "messages": [{"role": "user", "content": "<video>When does a man walk in?"},
                                           {"role": "assistant", "content": "From 0 to 10."}], "videos": ["v1.mp4"]}]
    (tmp_path / "mixed.txt").write_text(json.dumps(records))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(a) for a in (HAND[1][0], {"id": "v1#0", "answer": "From 5 to 10."})))
    report = evaluate(answers, tmp_path / "mixed.txt", captions=False, format="llamafactory")
    assert report.tasks == ("captioning", "grounding")
    assert [v.id for v in report.videos] == ["v1"] and report.precision[0.3] == pytest.approx(2 / 3)
    assert [(q.id, q.iou) for q in report.grounding.queries] == [("v1#0", 0.5)]
    result = CliRunner().invoke(main, ["eval", "--answers", str(answers), "--data", str(tmp_path / "mixed.txt"),
                                       "--format", "llamafactory", "--no-captions", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["grounding"]["mIoU"] == 0.5


# Samples over several media and none: two videos answered with dense captions, an image and a video
# answered with a grounding range, a text-only turn and a question about an image (nothing timed to
# score). Each written as content blocks and as qprep's own records, as `qprep infer --data` reads them.
SEVERAL_MEDIA = [  # (id, media, question, true answer)
    ("pair", ("cooking/a.mp4", "cooking/b.mp4"), "What happens in each?", HAND[0]["v1"]),
    ("mixed", ("photos/cat.jpg", "cooking/a.mp4"), "When does the cat in the picture appear?", "From 2 to 7.5."),
    ("text", (), "What is two plus two?", "Four."),
    ("photo", ("photos/cat.jpg",), "What is in the picture?", "A cat."),
]
SEVERAL_MEDIA_ANSWERS = [{"id": "pair", "answer": HAND[1][0]["answer"]}, {"id": "mixed", "answer": "From 3 to 7.5."},
                         {"id": "text", "answer": "Four."}, {"id": "photo", "answer": "A dog."}]


def several_media_records(form: str) -> list[dict]:
    if form == "blocks":
        return [{"id": name, "messages": [
            {"role": "user", "content": [{"type": "image" if path.endswith(".jpg") else "video",
                                          "image" if path.endswith(".jpg") else "video": path} for path in media]
             + [{"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": truth}]}]}
            for name, media, question, truth in SEVERAL_MEDIA]
    return [{"id": name, "media": [path.rsplit(".", 1)[0] for path in media], "conversations": [
        {"from": "human", "value": "".join("<image>" if p.endswith(".jpg") else "<video>" for p in media) + question},
        {"from": "gpt", "value": truth}]} for name, media, question, truth in SEVERAL_MEDIA]


@pytest.mark.parametrize("form", ["blocks", "qprep"])
def test_samples_over_several_media_are_scored_and_untimed_ones_named_as_such(tmp_path, form):
    """Two videos' dense captions are scored as dense captioning (HAND's v1: P@0.3 2/3), the image and
    video's range as a grounding query (IoU 4.5/5.5); the text-only and image-only records hold no
    time range: each is listed once from the data and its answer as having nothing to score, not as
    an unknown id."""
    from qprep.eval.truth import load_truth

    (tmp_path / "data.json").write_text(json.dumps(several_media_records(form)))
    answers = tmp_path / "answers.jsonl"
    answers.write_text("\n".join(json.dumps(a) for a in SEVERAL_MEDIA_ANSWERS))
    report = evaluate(answers, tmp_path / "data.json", captions=False)
    assert report.tasks == ("captioning", "grounding")
    assert [v.id for v in report.videos] == ["pair"] and report.precision[0.3] == pytest.approx(2 / 3)
    assert [(q.id, q.iou) for q in report.grounding.queries] == [("mixed", pytest.approx(4.5 / 5.5))]
    data = tmp_path / "data.json"
    assert report.problems == [
        f"{data}: record 2 (text): its first assistant turn holds no time range; not scored",
        f"{data}: record 3 (photo): its first assistant turn holds no time range; not scored",
        f"{answers}:3: 'text' has nothing to score against: its record in {data} has no time range in its first "
        "assistant turn; not scored",
        f"{answers}:4: 'photo' has nothing to score against: its record in {data} has no time range in its first "
        "assistant turn; not scored"]
    truth = load_truth(data, [])  # the cache ids each scored sample reads, in the conversation's order
    assert (truth["pair"].media, truth["mixed"].media) == (("cooking/a", "cooking/b"), ("photos/cat", "cooking/a"))

    result = CliRunner().invoke(main, ["eval", "--answers", str(answers), "--data", str(data), "--no-captions",
                                       "--per-video"])
    assert result.exit_code == 0, result.output
    assert "1 videos in" in result.output and "grounding: 1 queries" in result.output
    assert "'photo' has nothing to score against" in result.output
