"""The matrix: every cell of the selected matrix file (default matrix/ci.toml) is one test."""


def test_cell(compat_cell, compat_run):
    compat_run(compat_cell).assert_met()
