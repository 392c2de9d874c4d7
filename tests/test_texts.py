"""The calibration and evaluation texts that params.yaml's `data:` names (pipeline/texts.py)."""

from __future__ import annotations

import pytest

from optipfair import OptiPFairError
from optipfair.data import default_texts
from pipeline.texts import DEFAULT_OUT_OF_DOMAIN, load_out_of_domain_text, load_texts, out_of_domain_label, split_text

LINES = "".join(f"line {i} of the text\n" for i in range(100))


def test_a_text_is_cut_at_a_line_break_into_two_parts_that_make_it_whole():
    first, second = split_text(LINES, 0.25)
    assert first + second == LINES
    assert first.endswith("of the text") and second.startswith("\nline ")
    assert len(second) == pytest.approx(0.25 * len(LINES), abs=len("line 99 of the text\n"))


def test_a_text_without_a_line_break_after_the_share_is_cut_at_the_share():
    assert split_text("a" * 100, 0.25) == ("a" * 75, "a" * 25)


def test_the_sources_give_the_calibration_part_then_the_evaluation_part(tmp_path):
    assert load_texts({"source": "default", "evaluation_share": 0.25}) == default_texts(0.25)
    (tmp_path / "corpus.txt").write_text(LINES)
    assert load_texts({"source": "file", "path": str(tmp_path / "corpus.txt"), "evaluation_share": 0.5}) == \
        split_text(LINES, 0.5)
    with pytest.raises(OptiPFairError, match="missing.txt"):
        load_texts({"source": "file", "path": str(tmp_path / "missing.txt"), "evaluation_share": 0.5})


def test_the_out_of_domain_text_is_the_shipped_licenses_unless_a_file_is_named(tmp_path):
    shipped = load_out_of_domain_text({"out_of_domain_file": None})
    assert shipped == DEFAULT_OUT_OF_DOMAIN.read_text(encoding="utf-8") and "GNU GENERAL PUBLIC LICENSE" in shipped
    assert out_of_domain_label({"out_of_domain_file": None}) == "license texts (pipeline/out_of_domain.txt)"
    (tmp_path / "mine.txt").write_text("my own text\n")
    assert load_out_of_domain_text({"out_of_domain_file": str(tmp_path / "mine.txt")}) == "my own text\n"
    assert out_of_domain_label({"out_of_domain_file": str(tmp_path / "mine.txt")}) == str(tmp_path / "mine.txt")
