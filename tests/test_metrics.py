"""Task metrics: hand-computed small cases, and pycocoevalcap's own scorers and tokenizer where it is installed."""

import importlib.util
import math

import numpy as np
import pytest

from mlx_paligemma.tasks import metrics
from mlx_paligemma.tasks.detection import DetectedObject

CAPTIONS = ["A cat sitting on a red sofa.", "two dogs play in the snow", "a man riding a horse on the beach",
            "a cup of coffee", "an astronaut in a suit"]
CAPTION_REFS = [["A tabby cat asleep on a red sofa.", "a cat lying on a couch", "the cat is on the sofa"],
                ["Two dogs playing in snow.", "dogs running in the snow"],
                ["a person rides a horse along the beach", "a man on a horse by the sea", "horse riding at the beach"],
                ["a cup of coffee on a saucer", "coffee in a white cup"],
                ["an astronaut in her flight suit", "a woman in an orange suit"]]


# Caption text of every kind PTB tokenization treats specially: clitics, brackets, quotes, numbers, abbreviations,
# acronyms, punctuation inside words and in runs. CI's reference step checks each against pycocoevalcap's own
# tokenizer (the Java PTBTokenizer). Not emulated, so not here: rock'n'roll (PTB: rock 'n' roll), SGML-like <tags>
# (kept whole), we'd've (PTB: we 'd ve).
PTB_SENTENCES = [
    'Don\'t (you) see "the" dog\'s well-known 3.5 1,000 tricks... ok?',
    'A cat sitting on a red sofa.',
    'two dogs play in the snow',
    'A man riding a horse on the beach!',
    "I can't believe it won't stop; they're here, we've seen it, you'll see, she'd go, I'm fine.",
    "The dogs' bowls and James's hat.",
    "It's 10:30 and 5% of $20 is $1.",
    'Mr. Smith lives in the U.S. e.g. in N.Y.',
    'a black/white cat & a dog',
    "O'Brien's band",
    'a [red] {blue} ball',
    'wait -- what?!',
    "'single quotes' and `backticks`",
    'café naïve Zürich',
    'a  cat\twith   spaces',
    '3kg of apples at 9am',
    'the state-of-the-art model, 2x faster',
    '#hashtag @user email@example.com',
    'yes!!! no??? maybe...',
    "A man's bike, the men's room, a kids' toy.",
    "the 1990s and '90s music",
    'It is 3.14159 or 1/2 or 3-4 people.',
    'Hello, World: a test; another - one',
    'He said "hi."',
    'semi-truck on I-95',
    'cannot gonna wanna gotta',
    'a 12-year-old boy',
    "an 'ok' sign",
    'the end.',
    'U.S.A.',
    'etc.',
    "ain't",
    'Dr. Who and St. Paul vs. Mrs. Jones',
    'a sign that reads "STOP"',
    'A woman (left) and a man (right).',
    'a plate of food: rice, beans and salad',
    'Two people walk down the street, one holding an umbrella.',
    'A train on the tracks at 5 p.m.',
    'the number 42 on a jersey',
    'a 2-for-1 sale',
    'a 1:1 scale model',
    'a 100m race',
    'a cat; a dog: a bird',
    'A group of people standing around a table with food on it .',
    'a bus that says "Route 66" on it',
    'An airplane flying in the blue sky!',
    'i.e. the best',
    "shouldn't couldn't wouldn't",
]


def test_caption_tokens_follow_the_ptb_tokenizer():
    # pycocoevalcap 1.2's PTBTokenizer on two of them (recorded; the rest are checked against it in CI).
    assert metrics.caption_tokens(PTB_SENTENCES[0]) == [
        "do", "n't", "-lrb-", "you", "-rrb-", "see", "the", "dog", "'s", "well-known", "3.5", "1,000", "tricks", "ok"]
    assert " ".join(metrics.caption_tokens("Mr. Smith lives in the U.S. e.g. in N.Y.")) == \
        "mr. smith lives in the u.s. e.g. in n.y."


def test_bleu_by_hand():
    # 4 of 5 unigrams, 3 of 4 bigrams, 2 of 3 trigrams, 1 of 2 four-grams match; same length: no brevity penalty.
    assert metrics.bleu(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # Every n-gram matches, 4 words against the closest reference's 6: brevity penalty exp(1 - 6/4).
    assert metrics.bleu(["a b c d"], [["a b c d e f", "x y z w v u t s"]]) == pytest.approx(math.exp(-0.5))
    # Corpus level: counts add up over the set before the precisions are taken.
    assert metrics.bleu(["a b c d", "a b c d e"], [["a b c d"], ["a b c d f"]]) == pytest.approx(
        (8 / 9 * 6 / 7 * 4 / 5 * 2 / 3) ** 0.25)


def test_cider_by_hand():
    # Two images, no n-gram shared between them (df 1, idf log 2): a prediction equal to its one reference scores 10.
    assert metrics.cider(["a b c d", "e f g h"], [["a b c d"], ["e f g h"]]) == pytest.approx(10.0)
    # A prediction one word short: cosine 4/sqrt(20), 3/sqrt(12), 2/sqrt(6), 1/sqrt(2) for n = 1..4, and the
    # Gaussian length penalty exp(-1 / (2 * 6^2)) (pycocoevalcap's length counts bigrams: 3 against 4).
    short = 10 * np.mean([4 / math.sqrt(20), 3 / math.sqrt(12), 2 / math.sqrt(6), 1 / math.sqrt(2)]) * math.exp(-1 / 72)
    assert metrics.cider(["a b c d", "e f g h"], [["a b c d x"], ["e f g h"]]) == pytest.approx((short + 10) / 2)
    # An n-gram in every image's references carries no weight.
    assert metrics.cider(["a", "a"], [["a"], ["a"]]) == 0.0


# pycocoevalcap 1.2's scores on these captions (run with it installed, as CI's reference step does).
EXPECTED_CIDER, EXPECTED_BLEU = 2.7126898104429142, 0.38686728402226217


def test_bleu_and_cider_equal_pycocoevalcaps_scores():
    assert metrics.cider(CAPTIONS, CAPTION_REFS) == pytest.approx(EXPECTED_CIDER, abs=1e-12)
    assert metrics.bleu(CAPTIONS, CAPTION_REFS) == pytest.approx(EXPECTED_BLEU, abs=1e-12)


if importlib.util.find_spec("pycocoevalcap"):  # a 104 MB wheel: installed in CI's reference step only

    def test_pycocoevalcap_scores_these_captions_as_recorded():
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider

        # Its scorers take tokenized text (its tokenizer is a Java program); give them ours.
        gts = {i: [" ".join(metrics.caption_tokens(r)) for r in refs] for i, refs in enumerate(CAPTION_REFS)}
        res = {i: [" ".join(metrics.caption_tokens(c))] for i, c in enumerate(CAPTIONS)}
        assert Cider().compute_score(gts, res)[0] == pytest.approx(EXPECTED_CIDER, abs=1e-12)
        assert Bleu(4).compute_score(gts, res, verbose=0)[0][3] == pytest.approx(EXPECTED_BLEU, abs=1e-12)

    def test_caption_tokens_equal_pycocoevalcaps_ptb_tokenizer():
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # runs java

        theirs = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(PTB_SENTENCES)})
        differ = [(c, " ".join(metrics.caption_tokens(c)), theirs[i][0]) for i, c in enumerate(PTB_SENTENCES)
                  if " ".join(metrics.caption_tokens(c)) != theirs[i][0]]
        assert not differ, "\n".join(f"{c!r}: ours {a!r}, pycocoevalcap {b!r}" for c, a, b in differ)


@pytest.mark.parametrize("answer, normalized", [
    ("Two dogs.", "2 dogs"), ("The cat", "cat"), ("dont know", "don't know"), ("yes!", "yes"),
    ("red, white", "red white"), ("1,000", "1000"), ("3.5", "3.5"), ("black/white", "black white"),
])
def test_vqa_answer_normalisation(answer, normalized):
    assert metrics.normalize_vqa_answer(answer) == normalized


def test_vqa_accuracy_and_exact_match():
    refs = [["2", "2", "two", "3"], ["2", "3", "3"], ["yes"], ["A dog"]]
    predictions = ["two", "2", "Yes.", "dog"]
    # 3 humans said 2 -> 1; 1 of 3 -> 1/3; one reference: exact match after normalisation -> 1, 1.
    assert metrics.vqa_accuracy(predictions, refs) == pytest.approx((1 + 1 / 3 + 1 + 1) / 4)
    assert metrics.exact_match(predictions, refs) == pytest.approx(2 / 4)  # "two" and "2" are literally references
    assert metrics.exact_match([" cat "], [["cat"]]) == 1.0


def test_anls_and_character_error_rate():
    assert metrics.levenshtein("kitten", "sitting") == 3 and metrics.levenshtein("", "abc") == 3
    # 1 - 1/5; 0 (distance 1 >= threshold); case and spacing ignored; the best of two references.
    assert metrics.anls(["hello", "abc", "Hello  World", "total 42"], [["hallo"], ["xyz"], ["hello world"],
                                                                      ["total 43", "total 42"]]) == pytest.approx(
        (0.8 + 0 + 1 + 1) / 4)
    assert metrics.anls(["abcd"], [["abxy"]]) == 0.0  # distance exactly 0.5: below the threshold is required
    # (1 + 1) edits over 4 + 3 reference characters.
    assert metrics.character_error_rate(["abcd", "xy"], [["abed"], ["xyz"]]) == pytest.approx(2 / 7)
    assert metrics.character_error_rate(["abc"], [["zzzzzz", "abd"]]) == pytest.approx(1 / 3)


def obj(label, box, mask=None):
    return DetectedObject(label, tuple(float(v) for v in box), mask)


def test_box_iou_and_matching():
    assert metrics.box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert metrics.box_iou((0, 0, 10, 10), (20, 20, 30, 30)) == 0.0
    predicted = [obj("cat", (0, 0, 10, 10)), obj("cat", (1, 0, 11, 10)), obj("dog", (0, 0, 10, 10))]
    reference = [obj("cat", (1, 0, 11, 10)), obj("cat", (50, 50, 60, 60))]
    # The exact cat box pairs first; the other predicted cat has no reference left it overlaps; dogs have none.
    assert metrics.matched_ious(predicted, reference) == [1.0]


def test_detection_map_by_hand():
    gt = [[obj("cat", (0, 0, 100, 100))]]
    exact = metrics.detection_scores([[obj("cat", (0, 0, 100, 100))]], gt)
    assert exact["map_50"] == pytest.approx(1.0) and exact["map"] == pytest.approx(1.0) and exact["mean_iou"] == 1.0
    # IoU 0.72 passes the thresholds 0.50 .. 0.70: 5 of 10.
    shifted = metrics.detection_scores([[obj("cat", (0, 0, 100, 72))]], gt)
    assert shifted["map_50"] == pytest.approx(1.0) and shifted["map"] == pytest.approx(0.5)
    assert shifted["mean_iou"] == pytest.approx(0.72)
    # A wrong box ranked before the right one: precision 1/2 at full recall.
    ranked = metrics.detection_scores([[obj("cat", (200, 200, 300, 300)), obj("cat", (0, 0, 100, 100))]], gt)
    assert ranked["map_50"] == pytest.approx(0.5)
    # Two labels, one found: the mean over labels with reference boxes.
    two = metrics.detection_scores([[obj("cat", (0, 0, 100, 100))], []],
                                   [[obj("cat", (0, 0, 100, 100))], [obj("dog", (0, 0, 50, 50))]])
    assert two["map_50"] == pytest.approx(0.5) and two["reference_boxes"] == 2 and two["matched"] == 1
    assert metrics.detection_scores([[]], gt)["map"] == 0.0
    # Per class: the cat found, the dog not; the shifted cat passes 5 of the 10 IoU thresholds.
    assert two["per_class_ap"] == {"cat": pytest.approx(1.0), "dog": 0.0}
    assert shifted["per_class_ap"] == {"cat": pytest.approx(0.5)}
    assert metrics.detection_scores([[obj("bird", (0, 0, 9, 9))]], gt)["per_class_ap"] == {"cat": 0.0}


def test_precision_recall_by_hand():
    gt = [[obj("cat", (0, 0, 100, 100))], [obj("dog", (0, 0, 50, 50))]]
    wrong, right = (200.0, 200.0, 300.0, 300.0), (0.0, 0.0, 100.0, 100.0)
    ranked = [DetectedObject("cat", wrong, score=0.9), DetectedObject("cat", right, score=0.2)]
    curves = metrics.precision_recall([ranked, []], gt)
    assert list(curves) == ["cat", "dog"]
    recall, precision = curves["cat"]
    np.testing.assert_allclose(recall, np.linspace(0, 1, 101))
    # The right box second: precision 1/2 when it is reached, at full recall, so 1/2 at every recall (interpolated).
    np.testing.assert_allclose(precision, 0.5)
    np.testing.assert_allclose(curves["dog"][1], 0.0)  # no dog predicted
    assert metrics.precision_recall([[], []], gt) == {}


def test_per_question_scores_are_the_corpus_means_parts():
    short = 10 * np.mean([4 / math.sqrt(20), 3 / math.sqrt(12), 2 / math.sqrt(6), 1 / math.sqrt(2)]) * math.exp(-1 / 72)
    assert metrics.cider_scores(["a b c d", "e f g h"], [["a b c d x"], ["e f g h"]]) == pytest.approx([short, 10.0])
    assert metrics.vqa_scores(["two", "2"], [["2", "2", "two", "3"], ["2", "3", "3"]]) == pytest.approx([1, 1 / 3])
    assert metrics.anls_scores(["hello", "abc"], [["hallo"], ["xyz"]]) == pytest.approx([0.8, 0.0])
    assert metrics.exact_match_scores([" cat ", "dog"], [["cat"], ["cat"]]) == [1.0, 0.0]


def test_mask_iou_by_hand():
    def mask(x0, x1):
        m = np.zeros((4, 10), bool)
        m[:, x0:x1] = True
        return m

    box = (0, 0, 10, 4)
    references = [[obj("cat", box, mask(0, 4)), obj("dog", box, mask(6, 10))], [obj("cat", box, mask(0, 2))]]
    predictions = [[obj("cat", box, mask(0, 2)), obj("cat", box, mask(2, 6))], [obj("cat", box, mask(0, 2))]]
    scores = metrics.mask_scores(predictions, references)
    # cat: image 1 the union of two predicted masks (columns 0-5) against columns 0-3, I 16 U 24; image 2 I 8 U 8.
    # dog: nothing predicted, I 0 U 16.
    assert scores["per_class"] == {"cat": pytest.approx(24 / 32), "dog": 0.0}
    assert scores["mask_iou"] == pytest.approx((24 / 32 + 0) / 2)
