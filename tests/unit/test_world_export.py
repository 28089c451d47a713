"""export() writes every data set, with the columns the stages read."""

import json
import os

import pytest

from tether.world import export, read_jsonl, split_of, write_jsonl

COLUMNS = {
    "corpus": {"text"},
    "sft": {"prompt", "completion"},
    "sft_eval": {"prompt", "completion"},
    "pairs": {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"},
    "pairs_eval": {"prompt", "chosen", "rejected", "gold_chosen", "gold_rejected"},
    "rankings": {"prompt", "responses", "ranks", "gold"},
    "prompts": {"prompt"},
    "prompts_eval": {"prompt"},
}
SIZES = dict(n_corpus=30, n_sft=20, n_sft_eval=10, n_pairs=20, n_pairs_eval=10,
             n_rankings=8, k=3, n_prompts=15, n_prompts_eval=5)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("world_export")
    return export(str(out), seed=0, **SIZES)


def test_export_writes_every_file_with_its_columns(exported):
    assert set(exported) == set(COLUMNS)
    for name, path in exported.items():
        assert os.path.basename(path) == f"{name}.jsonl"
        rows = read_jsonl(path)
        assert rows and all(set(row) == COLUMNS[name] for row in rows), name
    assert len(read_jsonl(exported["corpus"])) == SIZES["n_corpus"]
    assert len(read_jsonl(exported["pairs_eval"])) == SIZES["n_pairs_eval"]
    for row in read_jsonl(exported["rankings"]):
        assert len(row["responses"]) == 3 and sorted(row["ranks"]) == [0, 1, 2]
    for row in read_jsonl(exported["pairs"]):
        assert isinstance(row["gold_chosen"], float) and row["chosen"] != row["rejected"]


def test_eval_files_hold_only_held_out_prompts(exported):
    for name in ("sft_eval", "pairs_eval", "prompts_eval"):
        assert all(split_of(r["prompt"]) == "eval" for r in read_jsonl(exported[name]))
    for name in ("sft", "pairs", "rankings", "prompts"):
        assert all(split_of(r["prompt"]) == "train" for r in read_jsonl(exported[name]))


def test_export_is_reproducible(exported, tmp_path):
    again = export(str(tmp_path), seed=0, **SIZES)
    for name in exported:
        with open(exported[name], "rb") as a, open(again[name], "rb") as b:
            assert a.read() == b.read(), name


def test_write_jsonl_is_atomic(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(str(path), [{"a": 1}, {"a": "é"}])
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": "é"}]

    def failing_rows():
        yield {"a": 2}
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        write_jsonl(str(path), failing_rows())
    # The old file is untouched and no temporary file is left behind.
    assert read_jsonl(str(path)) == [{"a": 1}, {"a": "é"}]
    assert os.listdir(tmp_path) == ["rows.jsonl"]
    assert json.loads(path.read_text().splitlines()[1]) == {"a": "é"}
