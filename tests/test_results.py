"""Tests for eval/results.py: exact rendering of small known metric dicts."""

import json

import numpy as np

from eval.results import ResultTable, leaderboard_markdown

METRICS = {
    "NDCG@1": 0.1,
    "HR@1": 0.1,
    "NDCG@5": 0.123456,
    "HR@5": 0.25,
    "NDCG@50": 0.3,
    "HR@50": 1.0,
    "MRR@5": 0.2,
    "MRR": 0.21,
    "num_examples": 40,
}


def test_result_table_markdown():
    expected = (
        "| Metric | @1 | @3 | @5 | @10 | @20 | @50 |\n"
        "|---|---|---|---|---|---|---|\n"
        "| NDCG | 0.1000 | - | 0.1235 | - | - | 0.3000 |\n"
        "| HR | 0.1000 | - | 0.2500 | - | - | 1.0000 |\n"
    )
    assert ResultTable(METRICS).to_markdown() == expected


def test_result_table_optional_mrr_row():
    lines = ResultTable(METRICS, rows=("NDCG", "HR", "MRR")).to_markdown().splitlines()
    assert lines[-1] == "| MRR | - | - | 0.2000 | - | - | - |"


def test_result_table_json_round_trip():
    table = ResultTable({**METRICS, "HR@3": np.float32(0.5), "invalid": np.int64(2)})
    text = table.to_json()
    loaded = json.loads(text)
    assert loaded["HR@3"] == 0.5 and loaded["invalid"] == 2 and loaded["num_examples"] == 40
    assert ResultTable.from_json(text).to_markdown() == table.to_markdown()


def test_leaderboard_markdown():
    results = {
        "SASRec": {
            "NDCG@1": 0.05,
            "HR@1": 0.05,
            "NDCG@10": 0.123456,
            "HR@10": 0.2,
            "train_s": 12.5,
        },
        "BIGRec": {"NDCG@1": 0.07, "HR@1": 0.07, "HR@10": 0.3, "invalid_rate": 0.125},
    }
    expected = (
        "| Model | NDCG@1 | HR@1 | NDCG@10 | HR@10 | train_s | invalid_rate |\n"
        "|---|---|---|---|---|---|---|\n"
        "| SASRec | 0.0500 | 0.0500 | 0.1235 | 0.2000 | 12.5000 | - |\n"
        "| BIGRec | 0.0700 | 0.0700 | - | 0.3000 | - | 0.1250 |\n"
    )
    assert (
        leaderboard_markdown(results, ks=(1, 10), extra_columns=("train_s", "invalid_rate"))
        == expected
    )
