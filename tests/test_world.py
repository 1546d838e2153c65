"""train.py's R1-Zero world: think-first solutions whose thoroughness varies, checks that correct a
slip, two notations; the trace parser, the metrics and grpo's default reward built on them."""
import random
import statistics

import pytest

import grpo
import train

pytestmark = pytest.mark.train

W = 4
SLIPPED = ("<think>06229 8 + 1 + 0 = 09,0622:9 3 + 9 + 0 = 12,062:29 check 7 + 5 + 1 = 13,06:329 "
           "4 + 2 + 1 = 07,0:7329 0 + 0 + 0 = 00,:07329 wrong</think><answer>07329</answer>")
CONFIRMED = ("<think>0046 check 6 + 0 + 0 = 06,004:6 4 + 0 + 0 = 04,00:46 ok</think>"
             "<answer>0046</answer>")


def solutions(n=3000, seed=0, width=6, **fields):
    tc = train.TrainConfig(max_digits=width, **fields)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = train.sample_problem(rng, 1, width)
        text, answer = train.zero_solution(a, b, width, rng, tc)
        out.append((a, b, "<think>" + text, answer))
    return out


def carries(a: int, b: int, width: int) -> list[int]:
    """The carry into each of the width + 1 columns of a + b."""
    out = [0]
    for i in range(width):
        lower = 10 ** (i + 1)
        out.append(int(a % lower + b % lower >= lower))
    return out


def test_every_solution_is_well_formed_and_answers_its_last_number():
    for a, b, text, answer in solutions(2000, verify_frac=0.3):
        assert train.well_formed(text), text
        assert train.parse_answer(text) == answer
        assert text.startswith("<think>") and text.count("<answer>") == 1


def test_a_solution_is_right_exactly_when_no_drafted_column_carries():
    """The draft forgets carries; worked columns fix them from the right. So the answer is right
    iff every column left as drafted has no carry in and sends none out."""
    for a, b, text, answer in solutions(3000, verify_frac=0.0):
        k = train.parse_trace(text)["worked"]
        c = carries(a, b, 6)
        # column i (i >= k) stays as drafted: wrong if it receives a carry
        assert (answer == a + b) == (not any(c[k:])), text
    # the draft alone is the hasty sum
    assert train.draft(4738, 2591, 4) == "06229" and int(train.draft(999, 1, 3)) == 990


def test_a_check_always_ends_right_and_says_wrong_only_when_it_changed_the_answer():
    seen = {True: 0, False: 0}
    for a, b, text, answer in solutions(2000, verify_frac=1.0):
        trace = train.parse_trace(text)
        if trace["verified"]:
            assert answer == a + b
            assert text.split("</think>")[0].endswith(" wrong" if trace["corrected"] else " ok")
            seen[trace["corrected"]] += 1
        else:
            # only the writers who stopped early check
            assert trace["worked"] == 7
    assert min(seen.values()) > 50


def test_the_corpus_is_mostly_short_spans_the_whole_range_and_rarely_checks():
    rows = solutions(4000)
    worked = [train.parse_trace(t)["worked"] for _, _, t, _ in rows]
    verified = statistics.mean(train.parse_trace(t)["verified"] for _, _, t, _ in rows)
    assert set(worked) == set(range(8))                # every thoroughness from 0 to 7 columns
    assert statistics.median(worked) == 0              # mostly the short end
    assert statistics.mean(worked) < 2.0 and worked.count(0) > len(worked) / 2
    assert 0.02 < verified <= 0.05                     # the aha pattern is rare (<= 5%)
    accuracy = statistics.mean(ans == a + b for a, b, _, ans in rows)
    assert 0.3 < accuracy < 0.5
    # textbook examples are complete, headed, never in the template's context
    tc = train.TrainConfig()
    rng = random.Random(0)
    examples = [train.render_example(12345, 678, rng, tc) for _ in range(1000)]
    books = [e for e in examples if e.startswith(train.TEXTBOOK)]
    assert 0.45 < len(books) / 1000 < 0.55
    assert all(train.parse_trace(e)["worked"] == 7 for e in books)
    assert all(train.parse_answer(e) == 13023 for e in books)


def test_the_two_notations_take_the_same_tokens_and_some_solutions_switch():
    enc = train.make_tokenizer(train.TrainConfig())
    sym = train.NOTATIONS["sym"].format(x=7, y=5, c=1, s=13)
    word = train.NOTATIONS["word"].format(x=7, y=5, c=1, s=13)
    assert len(train.encode(enc, sym)) == len(train.encode(enc, word)) == 11
    rows = solutions(3000, work_frac=0.9, verify_frac=0.0)
    mixed = statistics.mean(train.parse_trace(t)["mixed"] for _, _, t, _ in rows)
    # a share switch_frac switches at a random column; visible when both sides are worked
    assert 0.05 < mixed < 0.2


def test_parse_trace_by_hand():
    t = train.parse_trace(SLIPPED)
    assert (t["worked"], t["verified"], t["corrected"], t["mixed"]) == (5, True, True, False)
    assert t["consistency"] == 1.0
    mixed = ("<think>0046 6 + 0 + 0 = 06,004:6 1 plus 3 plus 0 is 04,00:46 0 plus 0 plus 0 is 00,"
             "0:046</think><answer>0046</answer>")
    t = train.parse_trace(mixed)
    assert t["notations"] == ["sym", "word", "word"] and t["mixed"]
    assert t["consistency"] == pytest.approx(2 / 3)
    # a check that confirms: verified, not corrected
    ok = CONFIRMED
    assert (train.parse_trace(ok)["verified"], train.parse_trace(ok)["corrected"]) == (True, False)
    # nothing to parse: an empty or missing think block, or steps outside it
    for text in ("<think></think><answer>1</answer>", "<answer>1</answer>",
                 "<think>12</think><answer>6 + 0 + 0 = 06,0046</answer>"):
        t = train.parse_trace(text)
        assert (t["worked"], t["verified"], t["mixed"], t["consistency"]) == (0, False, False, 1.0)
    # malformed steps (a one-digit sum, letters) are not counted as worked columns
    bad = "<think>0046 6 + 0 + 0 = 6,004:6 6 plus 0 plus 0 = 06,004:6</think><answer>0046</answer>"
    assert train.parse_trace(bad)["worked"] == 0


def test_trace_metrics_count_checks_corrections_and_truncation():
    texts = [SLIPPED, "<think>0046 6 + 0 + 0 = 06,004:6</think><answer>0046</answer><|eos|>",
             "<think>0046 6 + 0 + 0 = 06,004:6 6 + 0 + 0 = 06,00"]
    ids = [[0] * 15, [0] * 12, [0] * 20]
    m = train.trace_metrics(texts, ids, n_new=20)
    assert m["verification_rate"] == pytest.approx(1 / 3)
    assert m["correction_rate"] == pytest.approx(1 / 3)
    assert m["format_rate"] == pytest.approx(2 / 3)
    # the third hit the cap without an answer: counted, not silently scored 0
    assert m["truncation_rate"] == pytest.approx(1 / 3)
    assert m["steps_worked"] == pytest.approx((5 + 1 + 2) / 3)
    assert m["mean_length"] == pytest.approx(47 / 3)


def test_the_cap_holds_every_solution_of_the_world():
    enc = train.make_tokenizer(train.TrainConfig())
    cap = train.max_response_tokens(6, "zero", enc)
    # the generated part: after the template's <think>
    longest = max(len(train.encode(enc, t.removeprefix("<think>")))
                  for _, _, t, _ in solutions(3000, verify_frac=0.5))
    zero_longest = train.longest_responses(6)[0]
    assert longest == len(train.encode(enc, zero_longest)) <= cap - 8
    # without a tokenizer the bound is by characters, looser
    assert train.max_response_tokens(6) >= cap


def test_the_default_reward_is_accuracy_plus_format_on_the_whole_response():
    assert grpo.reward(SLIPPED, 7329) == 2.0
    assert grpo.reward(SLIPPED, 7330) == 1.0                       # well-formed, wrong
    assert grpo.reward(SLIPPED.removeprefix("<think>"), 7329) == 1.0    # right, no think block
    assert grpo.reward("<think></think><answer>07329</answer>", 7329) == 1.0
    assert grpo.reward(SLIPPED, 7329, format_weight=0.0) == 1.0
    assert grpo.reward(SLIPPED, 1, kind="format") == 1.0
    assert grpo.template([(12, 7)], 2) == ["<|bos|>12+07=<think>"]
    assert grpo.template([(12, 7)], 2, world="choice") == ["<|bos|>12+07="]


def test_aha_is_a_check_that_changed_the_answer_to_the_right_one():
    assert grpo.is_aha(SLIPPED, 7329)
    assert not grpo.is_aha(SLIPPED, 6229)
    assert not grpo.is_aha(CONFIRMED, 46)


def test_the_choice_world_is_still_there():
    tc = train.TrainConfig(world="choice", max_digits=3)
    text = train.corpus_text(tc, n=200)
    assert "<|bos|>" in text and "=<answer>" in text and "=<think>" in text
    zero = train.corpus_text(train.TrainConfig(max_digits=3), n=200)
    assert "=<answer>" not in zero and zero.count("=<think>") == 200
    with pytest.raises(SystemExit):
        train.parse_config(["--world", "chioce"])


def test_an_aha_must_say_its_slip():
    """A check that changed the answer but reports ' ok' found no slip it could name."""
    silent = SLIPPED.replace(" wrong</think>", " ok</think>")
    assert train.parse_trace(silent)["corrected"] and not grpo.is_aha(silent, 7329)


# ---- R1's recipe: readable solutions and language consistency (R1 §2.3.1-2.3.2)

PURE_WORD = ("<think>0046 6 plus 0 plus 0 is 06,004:6 4 plus 0 plus 0 is 04,00:46</think>"
             "<answer>0046</answer>")
MIXED = ("<think>0046 6 + 0 + 0 = 06,004:6 1 plus 3 plus 0 is 04,00:46 0 plus 0 plus 0 is 00,"
         "0:046</think><answer>0046</answer>")


@pytest.mark.parametrize("width", [1, 2, 4, 6])
@pytest.mark.parametrize("notation", ["sym", "word"])
def test_readable_solutions_are_right_complete_and_in_one_notation(width, notation):
    rng = random.Random(width)
    for _ in range(300):
        a, b = train.sample_problem(rng, 1, width)
        text = "<think>" + train.readable_solution(a, b, width, notation)
        trace = train.parse_trace(text)
        assert train.parse_answer(text) == a + b and train.well_formed(text)
        assert trace["worked"] == width + 1 and set(trace["notations"]) == {notation}
        assert not trace["verified"] and not trace["mixed"]
        assert trace["language_consistency"] == (1.0 if notation == "sym" else 0.0)
        # the summary restates the sum in the same notation, at the prompt's widths
        plus = " + " if notation == "sym" else " plus "
        assert f" so {a:0{width}d}{plus}{b:0{width}d}" in text


def test_the_cap_holds_readable_solutions():
    enc = train.make_tokenizer(train.TrainConfig())
    cap = train.max_response_tokens(6, "zero", enc)
    longest = max(len(train.encode(enc, train.readable_solution(a, b, 6, n)))
                  for a, b in [(0, 0), (999999, 999999), (123, 45)] for n in ("sym", "word"))
    # the cap is set by the longest of the two kinds
    assert longest == cap - 8


def test_language_consistency_by_hand():
    # pure: every column in the prompt's notation, or none of them
    assert train.parse_trace(SLIPPED)["language_consistency"] == 1.0
    assert train.parse_trace(PURE_WORD)["language_consistency"] == 0.0
    # mixed: 1 of 3 columns in symbols (the majority notation is words: consistency 2/3)
    t = train.parse_trace(MIXED)
    assert t["language_consistency"] == pytest.approx(1 / 3)
    assert t["consistency"] == pytest.approx(2 / 3)
    # empty: no reasoning, or reasoning with no column, is not consistent (0, not 1)
    for text in ("", "<answer>0046</answer>", "<think></think><answer>0046</answer>",
                 "<think>0046</think><answer>0046</answer>"):
        assert train.parse_trace(text)["language_consistency"] == 0.0


ADVERSARIAL = [
    # symbols outside the reasoning earn nothing
    ("<think>0046</think><answer>6 + 0 + 0 = 06,004:6</answer>", 0.0),
    ("<think>0046</think>6 + 0 + 0 = 06,004:6<answer>0046</answer>", 0.0),
    # symbol-like text that makes no step earns nothing; words beside symbol steps dilute them
    ("<think>+ + + = = = 6 + 0 = 6</think><answer>0046</answer>", 0.0),
    ("<think>0046 6 + 0 + 0 = 6,004:6 plus plus is</think><answer>0046</answer>", 0.0),
    # a check in words counts its columns too
    ("<think>0046 6 + 0 + 0 = 06,004:6 check 4 plus 0 plus 0 is 04,00:46 ok</think>"
     "<answer>0046</answer>", 0.5),
    # an unclosed think block: what follows it is still its reasoning
    ("<think>0046 6 + 0 + 0 = 06,004:6", 1.0),
]


@pytest.mark.parametrize("text,share", ADVERSARIAL)
def test_consistency_reward_on_adversarial_traces(text, share):
    assert grpo.consistency_reward(text) == pytest.approx(share)


def test_consistency_reward_is_summed_with_accuracy_and_format():
    for text, target in ((SLIPPED, 7329), (MIXED, 46), (PURE_WORD, 46), (PURE_WORD, 47)):
        parts = (grpo.accuracy_reward(text, target), grpo.format_reward(text),
                 grpo.consistency_reward(text))
        assert grpo.reward(text, target, consistency_weight=1.0) == pytest.approx(sum(parts))
        assert grpo.reward(text, target, consistency_weight=0.5) == pytest.approx(
            parts[0] + parts[1] + 0.5 * parts[2])
        # R1-Zero's reward is unchanged by default
        assert grpo.reward(text, target) == parts[0] + parts[1]
    assert grpo.reward(MIXED, 46, kind="format", consistency_weight=1.0) == 1.0


def test_trace_metrics_pool_language_consistency_over_columns():
    texts = [SLIPPED, MIXED, PURE_WORD, "<think>0046</think><answer>0046</answer>"]
    m = train.trace_metrics(texts, [[0]] * 4, n_new=200)
    # columns: 5 sym; 1 sym + 2 word; 2 word; none
    assert m["language_consistency"] == pytest.approx(6 / 10)
    assert m["mixing_rate"] == pytest.approx(1 / 4)
    assert train.trace_metrics(["<answer>1</answer>"], [[0]], 20)["language_consistency"] == 0.0
