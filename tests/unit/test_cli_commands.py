"""``headscope`` and ``python -m pipelines`` are one command line with every subcommand."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = {"run", "export-onnx", "ablate", "compare", "view", "plot", "factors", "models",
            "demo", "serve"}


def subcommands(command: list[str]) -> set[str]:
    result = subprocess.run([*command, "--help"], capture_output=True, text=True, check=True,
                            timeout=120)
    choices = re.search(r"\{([a-z,-]+)\}", result.stdout)
    assert choices, result.stdout
    return set(choices.group(1).split(","))


@pytest.mark.slow  # a model run per window: left out of make test-fast
def test_both_entry_points_list_the_same_subcommands_serve_included() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["headscope"] == "pipelines.cli:main"
    from_module = subcommands([sys.executable, "-m", "pipelines"])
    from_entry_point = subcommands([sys.executable, "-c",
                                    "import sys; from pipelines.cli import main; "
                                    "sys.argv[0] = 'headscope'; sys.exit(main())"])
    assert from_module == from_entry_point == EXPECTED
    installed = Path(sys.executable).parent / "headscope"
    if installed.is_file():  # the console script make setup installs
        assert subcommands([str(installed)]) == EXPECTED


def test_serve_help_does_not_start_ray() -> None:
    """The service front end is imported only when ``serve`` runs, not to list options."""
    code = ("import sys; from pipelines.cli import parser\n"
            "parser().parse_args(['serve', '--port', '1'])\n"
            "print(sorted(m for m in ('ray', 'service.app', 'fastapi') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "[]"
