"""The reproduction's verdicts follow the rules chapter 10 states, from the numbers of each network."""

import numpy as np
import pytest

from vefi.book.reproduction import ablation_claims, agreement, claims_table, markdown_table
from vefi.book.studies import AblationResult


def result(all_acc, onlyconv_acc, random_all, random_onlyconv, n_all=5, n_conv=3, candidates=(100, 40), seed=0):
    """An ablation result on 200 images of 2 classes whose predictions give the accuracies asked for."""
    rng = np.random.default_rng(seed)
    labels = np.repeat([0, 1], 100)

    def predictions(accuracy):
        right = rng.permutation(200) < round(accuracy * 200)
        return np.where(right, labels, 1 - labels)

    predicted = np.stack([labels, predictions(all_acc), predictions(onlyconv_acc)])
    acc = [float(np.mean([(predicted[i][labels == c] == c).mean() for c in (0, 1)])) for i in range(3)]
    return AblationResult("toy", 10.0, 200, n_all, n_conv, acc[0], acc[1], acc[2], np.asarray(random_all, float),
                          np.asarray(random_onlyconv, float), labels, predicted, candidates_all=candidates[0],
                          candidates_onlyconv=candidates[1])


def test_ablation_claims_follow_the_rules():
    draws = np.linspace(0.8, 0.99, 30)
    holds = result(0.5, 0.9, draws, draws)  # All lowest of all draws, OnlyConv above 5% of them
    few, sel_all, sel_conv, all_vs_conv = ablation_claims("toy", [holds], "92 / 101")
    assert few.holds == [True] and few.values == ["5 of 100 / 3 of 40"] and few.paper == "92 / 101"
    assert sel_all.holds == [True] and "0% as low" in sel_all.values[0]
    assert sel_conv.holds == [False]  # about half of the 30 draws are as low as 0.9
    assert all_vs_conv.holds == [True]  # 0.5 against 0.9 on the same 200 images: far beyond the interval

    # 10% of the candidates is not "few"; 0.005 apart on 200 images is within the paired interval
    crowded = result(0.90, 0.905, draws, draws, n_all=10, candidates=(100, 40))
    few, _, _, all_vs_conv = ablation_claims("toy", [holds, crowded], "")
    assert few.holds == [True, False] and few.verdict == agreement([True, False]) == "not robust: holds on 1 of 2"
    assert all_vs_conv.holds == [True, False]
    with pytest.raises(ValueError, match="no networks"):
        ablation_claims("toy", [], "")


def test_all_equal_to_onlyconv_is_said_and_does_not_hold():
    """On two an8Flower networks All selected no fully connected feature: the same ablation as OnlyConv."""
    draws = np.linspace(0.8, 0.99, 30)
    same = result(0.5, 0.5, draws, draws, n_all=3, n_conv=3, seed=1)
    same.predicted[2] = same.predicted[1]
    # All's counts list every layer, the fully connected ones with 0; OnlyConv's only the convolutional part
    same.counts_all, same.counts_onlyconv = {"2 relu": 3, "9 fc": 0}, {"2 relu": 3}
    differ = result(0.5, 0.9, draws, draws)
    differ.counts_all, differ.counts_onlyconv = {"2 relu": 3, "9 fc": 2}, {"2 relu": 3}
    *_, all_vs_conv = ablation_claims("toy", [same, differ], "")
    assert all_vs_conv.holds == [False, True]
    assert "the same ablation)" in all_vs_conv.values[0] and "+0.000" in all_vs_conv.values[0]
    assert "the same ablation" not in all_vs_conv.values[1]


def test_the_claims_table_is_one_row_per_claim_with_escaped_cells():
    claims = ablation_claims("a|b", [result(0.5, 0.9, [0.9] * 30, [0.9] * 30)], "x")
    table = claims_table(claims).splitlines()
    assert len(table) == 2 + len(claims) and table[1] == "|---|---|---|---|---|---|"
    assert all(line.count("|") - line.count("\\|") == 7 for line in table)
    assert "a\\|b: few features" in table[2] and table[2].endswith("| reproduced: holds on 1 of 1 |")
    with pytest.raises(ValueError, match="2 cells and the header 3"):
        markdown_table(["a", "b", "c"], [[1, 2]])
