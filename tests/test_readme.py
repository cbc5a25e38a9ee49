"""The README's guide to the training logs names every value the training loop logs.

    python -m pytest tests/test_readme.py
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_log_guide_covers_every_logged_value():
    readme = (REPO / "README.md").read_text()
    match = re.search(r"^## What healthy training logs look like\n(.*?)^## ", readme, re.S | re.M)
    assert match, "README.md lacks its section on training logs"
    guide = match.group(1)
    source = (REPO / "sida_edm2" / "train" / "trainer.py").read_text()
    logged = set(re.findall(r'(?:stats\.add|_log_mean)\(\s*"([^"]+)"', source))
    assert {"loss/fake_score", "loss/discriminator", "skipped/steps/count"} <= logged  # the regex works
    logged |= {"skipped_steps_g", "skipped_steps_f", "phase", "maintenance_sec"}
    missing = sorted(name for name in logged if f"`{name}`" not in guide)
    assert not missing, f"not explained in README.md: {missing}"
