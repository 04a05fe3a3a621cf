"""GRPO's rewards on hand-made answers: each expected value worked out by hand from the formula in
`qprep.train.rewards` (Time-R1's IoU and iou_v2, the ActivityNet evaluator's tIoU rules), on records
read from a Charades-style file by `qprep.datasets.load` as training reads them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qprep.datasets import DataFile, load
from qprep.errors import SettingsError
from qprep.train.rewards import BUILT_INS, resolve_rewards, scored_ranges, truth_of

DURATION = 40.0


@pytest.fixture
def charades(tmp_path):
    """The file as Charades-STA circulates it: video v1, two sentences."""
    path = tmp_path / "charades.json"
    path.write_text(json.dumps({"v1": {"duration": DURATION, "timestamps": [[10, 20], [0, 10]],
                                       "sentences": ["a person opens a door.", "a person sits down."]}}))
    return path


@pytest.fixture
def grounding_record(charades):
    """The grounding sample of sentence 0 (true range 10 to 20 s), with the video's duration."""
    record = next(r for r in load(DataFile(charades)) if r["id"] == "v1#0")
    return {**record, "duration": DURATION}


@pytest.fixture
def captions_record(charades):
    (record,) = load(DataFile(charades, task="captions"))
    return {**record, "duration": DURATION}


def score(name: str, answers: list[str], record: dict) -> list[float]:
    (reward,) = resolve_rewards([name])
    return reward(["prompt"] * len(answers), answers, [record] * len(answers))


def test_the_truth_is_the_records_answer_and_its_duration(grounding_record, captions_record):
    truth = truth_of(grounding_record)
    assert [(s.start, s.end) for s in truth.segments] == [(10.0, 20.0)] and truth.duration == DURATION
    assert [(s.start, s.end, s.text) for s in truth_of(captions_record).segments] == [
        (10.0, 20.0, "a person opens a door"), (0.0, 10.0, "a person sits down")]
    without = {key: value for key, value in grounding_record.items() if key != "duration"}
    assert truth_of(without).duration is None
    assert truth_of({**without, "meta": {"duration": 12.5}}).duration == 12.5


def test_tiou_on_hand_made_answers(grounding_record):
    answers = {
        "From 10 to 20.": 1.0,  # perfect
        "From 25.5 to 30.": 0.0,  # disjoint
        "From 0 to 20.": 0.5,  # half of the union: 10 / 20
        "From 15 to 25.": 5 / 15,  # overlap 15-20, hull 10-25
        "From 20 to 10.": 0.0,  # written end first: overlaps nothing
        "From 12 to 12.": 0.0,  # zero length
        "From 10 to 90.": 10 / 30,  # clipped to the 40 s video: 10-40 against 10-20
        "From 50 to 60.": 0.0,  # past the end
        "I could not find it.": 0.0,  # no range
        "": 0.0,
        "<think>at 0 to 5 s maybe</think><answer>From 10 to 15.</answer>": 0.5,  # the <answer> block is read
        "From " + "9" * 400 + " to 10.": 0.0,  # a time too large for a float
    }
    assert score("tiou", list(answers), grounding_record) == pytest.approx(list(answers.values()), abs=1e-12)


def test_tiou_of_an_empty_union_is_zero(grounding_record):
    point = {**grounding_record, "conversations": [*grounding_record["conversations"][:-1],
                                                   {"from": "gpt", "value": "From 5 to 5."}]}
    assert score("tiou", ["From 5 to 5.", "From 5 to 6."], point) == [0.0, 0.0]


def test_iou_v2_weighs_the_iou_by_the_distance_of_each_end(grounding_record):
    # truth 10-20 in 40 s: IoU · (1 - |10 - ŝ| / 40) · (1 - |20 - ê| / 40)
    answers = {"From 10 to 20.": 1.0,
               "From 12 to 20.": 0.8 * (1 - 2 / 40) * 1.0,
               "From 0 to 20.": 0.5 * (1 - 10 / 40) * 1.0,
               "From 15 to 25.": (5 / 15) * (1 - 5 / 40) * (1 - 5 / 40),
               "From 10 to 90.": (10 / 30) * 1.0 * (1 - 20 / 40),  # clipped to 10-40
               "From 25 to 30.": 0.0, "From 20 to 10.": 0.0, "no range": 0.0}
    assert score("iou_v2", list(answers), grounding_record) == pytest.approx(list(answers.values()), abs=1e-12)


def test_iou_v2_needs_the_duration(grounding_record):
    without = {key: value for key, value in grounding_record.items() if key != "duration"}
    (reward,) = resolve_rewards(["iou_v2"])
    assert "needs the video's duration" in reward.problem(without) and reward.problem(grounding_record) is None
    with pytest.raises(SettingsError, match="'v1#0'.*iou_v2 needs the video's duration"):
        reward(["p"], ["From 10 to 20."], [without])


def test_dense_rewards_on_hand_made_answers(captions_record):
    # truth: 10-20 (door), 0-10 (sits down)
    perfect = "From 10 to 20, a person opens a door. From 0 to 10, a person sits down."
    one_of_two = "From 10 to 20, a person opens a door. From 30 to 40, a person leaves."
    half = "From 15 to 20, a door opens."  # tIoU 5/10 with 10-20: hits at 0.3 only (> 0.3, not > 0.5)
    reversed_range = "From 20 to 10, a person opens a door."
    answers = [perfect, one_of_two, half, reversed_range, "nothing happens"]
    # F1 per threshold (0.3, 0.5, 0.7, 0.9), averaged: perfect 1; one_of_two P = R = 1/2 at each;
    # half: P = 1, R = 1/2 (F1 2/3) at 0.3, 0 above
    assert score("dense_f1", answers, captions_record) == pytest.approx([1.0, 0.5, (2 / 3) / 4, 0.0, 0.0])
    # best tIoU per true segment, averaged: perfect (1, 1); one_of_two (1, 0); half (0.5, 0)
    assert score("dense_tiou", answers, captions_record) == pytest.approx([1.0, 0.5, 0.25, 0.0, 0.0], abs=1e-7)


def test_format_asks_for_the_records_form(grounding_record, captions_record):
    grounding = {"From 10 to 20.": 1.0, "<answer>From 1.5 to 3.</answer>": 1.0,
                 "From 1 to 2. From 3 to 4.": 0.0,  # two ranges for one query
                 "From 20 to 10.": 0.0, "From 12 to 12.": 0.0, "From 10 to 41.": 0.0,  # beyond the 40 s
                 "The door opens.\nFrom 10 to 20.": 0.0,  # a line without a range
                 "no range at all": 0.0}
    assert score("format", list(grounding), grounding_record) == list(grounding.values())
    dense = {"From 0 to 10, a person sits. From 10 to 20, a door opens.": 1.0,
             "From 0 to 10, a person sits.": 1.0,
             "From 0 to 10. From 10 to 20.": 0.0}  # ranges without captions
    assert score("format", list(dense), captions_record) == list(dense.values())


def test_a_user_reward_by_import_path_is_checked_and_logged_under_its_name(grounding_record):
    rewards = resolve_rewards(["tiou", "reward_helpers:short", "format"])
    assert [r.name for r in rewards] == ["tiou", "short", "format"]
    answers = ["From 10 to 20.", "The answer is from 10 to 20 seconds."]
    assert rewards[1](["p", "p"], answers, [grounding_record] * 2) == [1.0, 0.0]
    assert rewards[1].problem(grounding_record) is None


@pytest.mark.parametrize("spec, message", [
    ("reward_helpers:too_few", "reward too_few returned of 1, not a list of 2 floats"),
    ("reward_helpers:not_a_list", "reward not_a_list returned float, not a list of 2 floats"),
    ("reward_helpers:not_finite", "reward not_finite returned nan among its rewards"),
    ("reward_helpers:not_numbers", "reward not_numbers returned '1' among its rewards"),
    ("reward_helpers:fails", "reward fails raised KeyError: 'score'"),
])
def test_a_user_reward_that_returns_other_than_one_finite_float_per_completion_is_named(spec, message,
                                                                                        grounding_record):
    (reward,) = resolve_rewards([spec])
    with pytest.raises(SettingsError, match=message):
        reward(["p", "p"], ["a", "b"], [grounding_record] * 2)


@pytest.mark.parametrize("spec, message", [
    ("iou", "--reward iou: not a built-in reward \\(tiou, iou_v2, dense_f1, dense_tiou, format\\) nor an import path"),
    ("no_such_package_for_qprep:f", "--reward no_such_package_for_qprep:f: cannot import no_such_package_for_qprep "
                                    "\\(ModuleNotFoundError"),
    ("reward_helpers:absent", "--reward reward_helpers:absent: reward_helpers has no absent"),
    ("reward_helpers:NOT_CALLABLE", "--reward reward_helpers:NOT_CALLABLE: NOT_CALLABLE is a int, not a function"),
    (":short", "not a built-in reward"),
])
def test_a_reward_that_cannot_be_found_is_named_with_the_cause(spec, message):
    with pytest.raises(SettingsError, match=message):
        resolve_rewards([spec])


def test_two_rewards_under_one_name_are_refused():
    with pytest.raises(SettingsError, match="tiou named twice"):
        resolve_rewards(["tiou", "format", "tiou"])
    assert len(resolve_rewards(list(BUILT_INS))) == len(BUILT_INS)


def test_a_record_without_a_range_in_its_answer_is_reported_not_scored(grounding_record):
    no_truth = {**grounding_record, "conversations": [*grounding_record["conversations"][:-1],
                                                      {"from": "gpt", "value": "A door."}]}
    (reward,) = resolve_rewards(["tiou"])
    assert "'v1#0': no truth to score answers against" in reward.problem(no_truth)
    with pytest.raises(SettingsError, match="no truth"):
        reward(["p"], ["From 10 to 20."], [no_truth])


def test_the_readmes_reward_example_is_a_reward(grounding_record, tmp_path, monkeypatch):
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r"```python\n# mypkg/rewards\.py: --reward (\S+)\n(.*?)```", readme, re.S)
    assert match, "the README lost its reward example"
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "rewards.py").write_text(match.group(2))
    monkeypatch.syspath_prepend(str(tmp_path))
    (reward,) = resolve_rewards([match.group(1)])
    assert reward.name == "short"
    assert reward(["p", "p"], ["From 10 to 20.", "x" * 41], [grounding_record] * 2) == [1.0, 0.0]


# Time-R1's rewards as its trainer computes them: `main.py` of github.com/xiaomi-research/time-r1
# (commit 7f2b594, Apache-2.0), `parse_timestamp_output`, `iou_timestamp_reward` and
# `iou_timestamp_reward_v2`, their arithmetic as written, the logging left out.
def time_r1_parse(output_string):
    answer_matches = re.findall(r"<answer>(.*?)</answer>", output_string, re.DOTALL)
    if not answer_matches:
        return None
    matches = re.findall(r"(\d+\.?\d*) (to|and) (\d+\.?\d*)", answer_matches[-1], re.IGNORECASE)
    if not matches:
        return None
    return float(matches[-1][0]), float(matches[-1][2])


def time_r1_rewards(content, sol, duration):
    """(iou, iou_v2) of one completion."""
    from_number, to_number = time_r1_parse(content)
    s, e = sol
    intersection = max(0, min(to_number, e) - max(from_number, s))
    union = max(to_number, e) - min(from_number, s)
    iou = intersection / union
    v2 = iou * (1 - abs(1.0 * s / duration - 1.0 * from_number / duration)) * (
        1 - abs(1.0 * e / duration - 1.0 * to_number / duration))
    return iou, v2


def test_tiou_and_iou_v2_equal_time_r1s_own_rewards_on_well_formed_answers(tmp_path):
    """Answers in Time-R1's form, one range each, start first, within the video: where its rules and
    ours meet, the same floats."""
    durations = {"v1": 31.7, "v2": 12.0, "v3": 146.25}
    truths = {"v1": [[3.4, 9.9], [0.0, 31.7]], "v2": [[0.5, 1.0], [6.0, 12.0]], "v3": [[20.0, 85.5], [140.1, 146.0]]}
    path = tmp_path / "charades.json"
    path.write_text(json.dumps({video: {"duration": durations[video], "timestamps": stamps,
                                        "sentences": [f"event {k}" for k in range(len(stamps))]}
                                for video, stamps in truths.items()}))
    records = [{**record, "duration": durations[record["id"].split("#")[0]]} for record in load(DataFile(path))]
    predictions = [(0.0, 4.2), (3.4, 9.9), (5.5, 30.0), (0.1, 12.0), (7.25, 8.0), (60.0, 146.25), (11.9, 12.0)]
    completions, answered, theirs = [], [], []
    for record in records:
        video, k = record["id"].split("#")
        for start, end in predictions:
            if end > durations[video]:
                continue
            completions.append(f"<think>the event {k}.</think> <answer>{start} to {end}</answer>")
            answered.append(record)
            theirs.append(time_r1_rewards(completions[-1], truths[video][int(k)], durations[video]))
    assert len(completions) > 30 and any(0 < iou < 1 for iou, _ in theirs) and any(iou == 1 for iou, _ in theirs)
    tiou, iou_v2 = resolve_rewards(["tiou", "iou_v2"])
    prompts = ["p"] * len(completions)
    assert tiou(prompts, completions, answered) == [iou for iou, _ in theirs]
    assert iou_v2(prompts, completions, answered) == [v2 for _, v2 in theirs]


def test_dense_rewards_equal_qprep_evals_scores_of_the_same_answer(charades, captions_record, tmp_path):
    """The reward a dense-captioning answer gets is the score `qprep eval` gives it alone."""
    from qprep.eval.score import evaluate

    answers = ["From 10 to 20, a person opens a door. From 0 to 10, a person sits down.",
               "From 9.5 to 19, a door. From 2 to 8.5, sitting. From 30 to 35, leaving.",
               "From 14 to 20, a door opens."]
    dense_f1, dense_tiou = resolve_rewards(["dense_f1", "dense_tiou"])
    rewards = [reward(["p"] * 3, answers, [captions_record] * 3) for reward in (dense_f1, dense_tiou)]
    for index, answer in enumerate(answers):
        path = tmp_path / f"answers{index}.jsonl"
        path.write_text(json.dumps({"id": "v1", "answer": answer}) + "\n")
        report = evaluate(path, charades, captions=False, task="captioning")
        assert rewards[0][index] == pytest.approx(report.mean(report.f1), abs=1e-12)
        assert rewards[1][index] == pytest.approx(report.best_tiou, abs=1e-12)
    assert len(set(rewards[0])) == 3  # three different scores, none trivially 0 or 1


def test_no_answer_makes_a_built_in_raise_and_every_score_lies_within_0_and_1(grounding_record, captions_record):
    """Answers put together at random from the pieces answers are made of (times reversed, equal, past
    the end, in m:ss, too large for a float; stray tags and text): each built-in scores every one
    within [0, 1]."""
    import random

    chooser = random.Random(0)
    times = ["0", "7", "10", "12.5", "20", "39.9", "40", "41", "75", "1:05", "0:12", "9" * 400]
    joins = [" to ", " - ", "-", " and ", ", "]
    noise = ["", "From ", "between ", "[", "(", "a door opens", ".", "\n", "<answer>", "</answer>", "<think>",
             " seconds", "2.", ": ", "nothing"]

    def answer() -> str:
        parts = []
        for _ in range(chooser.randint(0, 4)):
            parts += [chooser.choice(noise), chooser.choice(times), chooser.choice(joins), chooser.choice(times),
                      chooser.choice(noise), chooser.choice(noise)]
        return "".join(parts)

    answers = [answer() for _ in range(300)]
    for record in (grounding_record, captions_record):
        for reward in resolve_rewards(list(BUILT_INS)):
            scores = reward(["p"] * len(answers), answers, [record] * len(answers))
            assert all(0.0 <= value <= 1.0 for value in scores), reward.name
            assert len(set(scores)) > 2 or reward.name == "format", reward.name  # scored, not all 0
    assert sum(bool(scored_ranges(answer, DURATION)[0]) for answer in answers) > 150
