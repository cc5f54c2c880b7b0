"""The one calibration / held-out split of python-docs that every method, bench and test uses."""

from __future__ import annotations

from slimlm.data import HELD_OUT, calibration_corpus, calibration_docs, held_out_docs, python_docs


def test_calibration_and_held_out_are_disjoint_and_cover_the_corpus():
    calib, held = calibration_docs(), held_out_docs()
    assert len(held) == HELD_OUT == 3
    assert calib + held == python_docs()  # together the whole corpus, in its order
    assert not set(calib) & set(held)  # no held-out text is calibrated on
    assert held == python_docs()[-3:]  # the last three topics, as every method and bench had written out


def test_the_split_is_the_same_every_call():
    assert calibration_docs() == calibration_docs() and held_out_docs() == held_out_docs()


def test_another_held_out_size_and_other_sources(tmp_path):
    assert calibration_docs(5) + held_out_docs(5) == python_docs() and len(held_out_docs(5)) == 5
    assert calibration_docs(0) == python_docs() and held_out_docs(0) == []
    assert calibration_corpus() == calibration_docs()  # the built-in corpus keeps its held-out topics out
    (tmp_path / "mine.txt").write_text("my own text")
    assert calibration_corpus(str(tmp_path / "mine.txt")) == ["my own text"]  # a user's own text is used whole
