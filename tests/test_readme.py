"""README.md stays short and true to the repository: under 120 lines, and every link resolves inside it."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_is_short_and_links_stay_in_the_repo():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 120
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links  # the docs, the picture
    for link in links:
        assert not link.startswith(("http:", "https:", "/", "..")), link
        path = link.split("#")[0]
        assert (ROOT / path).exists(), link
    assert "```bash\npip install -e \".[dev]\" && python -m pytest\n```" in text  # what .ci/run runs
    assert "pip install -e \".[dev]\" && python -m pytest" in (ROOT / ".ci" / "run").read_text()
