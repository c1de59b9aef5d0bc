"""The LICENSE file is the license pyproject.toml declares."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_license_file_matches_pyproject():
    declared = re.search(r'^license = \{ text = "(.*)" \}$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert declared == "Apache-2.0"
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text  # the whole license, not a stub
