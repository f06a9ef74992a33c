"""``experiments.universality --text``: one file, several files, folders of line-per-record
.txt and .jsonl files, in the order given; a missing or empty source is a one-line error from
the settings rules, before any model is loaded."""

import json

import pytest

from experiments import common
from experiments.configs import universality as CONFIG  # noqa: N812


def _values(**over):
    values = common.default_values(CONFIG)
    values.update(preset="lm", workdir="/nonexistent-parent-is-fine/run", **over)
    return values


def _settings(values):
    return common.settings_value("universality", values, CONFIG.FIELDS)


def _problems(values) -> str:
    with pytest.raises(common.ConfigError) as e:
        common.validate(values, common.rules_of(CONFIG))
    return str(e.value)


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\nthree\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "b.jsonl").write_text(
        "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(["four", "five"])) + "\n"
    )
    (folder / "c.txt").write_text("six\nseven eight\n")
    (folder / "notes.md").write_text("not text input\n")  # other extensions are not read
    return tmp_path


def test_files_and_folders_read_in_order(corpus):
    from experiments import universality
    from experiments.pipeline import lm_preset

    a, folder = str(corpus / "a.txt"), str(corpus / "folder")
    values = _values(text=[a, folder], txt_split="line", text_field="body")
    common.validate(values, common.rules_of(CONFIG))  # no problem
    settings = _settings(values)
    docs = list(lm_preset.read_text(settings))
    assert docs == ["one", "two", "three", "four", "five", "six", "seven eight"]
    # one file alone, split by paragraphs
    one = _settings(_values(text=[a], txt_split="paragraph"))
    assert list(lm_preset.read_text(one)) == ["one", "two\nthree"]
    # every source enters the run fingerprint (an edited file refuses a resume)
    data = universality._data(settings)
    assert data["text.0"] == a and data["text.1"] == folder


def test_bad_sources_are_one_line_errors(corpus, tmp_path):
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "nothing").mkdir()
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "x.jsonl").write_text("")
    (tmp_path / "data.csv").write_text("a,b\n")
    good = str(corpus / "a.txt")
    cases = {
        str(tmp_path / "missing.txt"): "no such file or directory",
        str(tmp_path / "empty.txt"): "is an empty file",
        str(tmp_path / "nothing"): "holds no .txt/.jsonl files",
        str(blank): "is a folder of empty text files",
        str(tmp_path / "data.csv"): "unknown extension",
    }
    for bad, expected in cases.items():
        msg = _problems(_values(text=[good, bad]))
        assert f"--text={bad}" in msg and expected in msg, msg
        assert "\n" not in msg
    assert "--text: expected at least one" in _problems(_values(text=[]))
