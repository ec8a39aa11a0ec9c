"""errors.first_line: the one helper that quotes an exception inside a one-line error."""

from mnist_cnn.errors import first_line


def test_first_line_takes_the_first_line_and_cuts_it():
    assert first_line(RuntimeError("  boom\nsecond line\n")) == "boom"
    assert first_line(ValueError("x" * 300), limit=10) == "x" * 10 + "..."
    assert first_line(ValueError("x" * 10), limit=10) == "x" * 10


def test_first_line_of_an_empty_message_is_the_type_name():
    # str(KeyError()) == '' and str(RuntimeError('\n')) is blank: two of the old copies crashed here
    assert first_line(KeyError()) == "KeyError"
    assert first_line(RuntimeError("\n  \n")) == "RuntimeError"
