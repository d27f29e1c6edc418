"""The README's two set-up commands: CI (.ci/run) runs the test command verbatim, and the quickstart's command
installs the jax extra alone, which is all that `python train_jax.py` imports."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What the test extra and the torch extra bring, and the quickstart must not need.
NOT_IN_THE_QUICKSTART = ("torch", "tensorflow", "tensorflow_datasets", "clu", "hypothesis", "pytest")


def setup_command(lead: str) -> str:
    """The one-line ```bash block that follows the README's paragraph starting with `lead`."""
    section = (ROOT / "README.md").read_text().split("## Set-up: two commands", 1)[1].split("\n## ", 1)[0]
    match = re.search(re.escape(lead) + r".*?```bash\n(.*?)\n```", section, re.S)
    assert match, f"README set-up: no command after {lead!r}"
    return match.group(1)


def test_ci_runs_the_readme_test_command_verbatim():
    command = setup_command("Run the tests")
    assert command.endswith("&& pytest") and '".[jax,torch,test]"' in command
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_the_quickstart_installs_the_jax_extra_and_imports_nothing_else():
    assert setup_command("Train the quickstart model") == 'pip install -e ".[jax]" && python train_jax.py'
    # What train_jax.py imports to train the quickstart, with the other extras' packages made unimportable.
    code = f"""
import sys

class Absent:                 # as if not installed: their import raises ModuleNotFoundError
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {NOT_IN_THE_QUICKSTART!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Absent())
import train_jax
from vdm_jax import engine
from vdm_common import config, data, trainer
data.load_dataset(config.load_config("configs/quickstart.py").data)
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
