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
