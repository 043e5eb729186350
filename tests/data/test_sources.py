"""Loading rows with datasets: JSONL, Parquet, text, globs; a bad row names its file and row; the hub offline."""

import json

import datasets
import pytest

from mtp.data.sources import DataSourceError, load_rows

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "model", "content": "hello"}]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_parquet_and_text_in_order(tmp_path):
    _jsonl(tmp_path / "a.jsonl", [CHAT, {"text": "a document"}, {"prompt": "p", "response": "r"}])
    datasets.Dataset.from_list([{"text": "from parquet"}]).to_parquet(str(tmp_path / "b.parquet"))
    (tmp_path / "c.txt").write_text("first paragraph\nstill first\n\nsecond paragraph\n")
    rows = load_rows([str(tmp_path / "a.jsonl"), str(tmp_path / "b.parquet"), str(tmp_path / "c.txt")])
    assert len(rows) == 6
    assert rows[0]["messages"] == CHAT["messages"] and rows[1]["text"] == "a document"
    assert rows[2]["prompt"] == "p" and rows[3]["text"] == "from parquet"
    assert [rows[4]["text"].strip(), rows[5]["text"].strip()] == ["first paragraph\nstill first", "second paragraph"]
    assert rows.locate(4) == (str(tmp_path / "c.txt"), 1) and rows[-1] == rows[5]


def test_globs_and_directories(tmp_path):
    for name in ("x1.jsonl", "x2.jsonl"):
        _jsonl(tmp_path / name, [CHAT, CHAT])
    assert len(load_rows(str(tmp_path / "x*.jsonl"))) == 4
    assert len(load_rows(str(tmp_path))) == 4
    with pytest.raises(DataSourceError, match="No data files match"):
        load_rows(str(tmp_path / "missing*.jsonl"))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, "message 2 has role 'bot'"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no model"),
        ({"answer": "42"}, "needs 'messages'"),
    ],
)
def test_a_bad_row_names_file_row_and_problem(tmp_path, bad, message):
    path = _jsonl(tmp_path / "data.jsonl", [CHAT, CHAT, bad, CHAT])
    with pytest.raises(DataSourceError, match=rf"data\.jsonl row 3: .*{message}"):
        load_rows(str(path))


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text(json.dumps(CHAT) + "\n" + '{"messages": [\n')
    with pytest.raises(DataSourceError, match=r"broken\.jsonl line 2: not valid JSON"):
        load_rows(str(path))


def test_unvalidated_rows_still_locate_their_file(tmp_path):
    path = _jsonl(tmp_path / "data.jsonl", [CHAT, {"answer": "42"}])
    rows = load_rows(str(path), check=False)
    assert rows.locate(1) == (str(path), 2)


def test_hub_name_offline_says_the_hub_is_unreachable():
    # tests/conftest.py sets HF_HUB_OFFLINE=1, so this fails fast as it would on a machine without the hub.
    with pytest.raises(DataSourceError, match="may not reach the hub"):
        load_rows("some-org/some-chat-dataset")
