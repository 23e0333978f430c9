"""Shared fixtures: golden data and the two official-format checkpoints."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
FIXTURES = ROOT / "tests" / "fixtures"

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def golden() -> dict:
    """Figures computed by the reference implementation (see tests/fixtures/README.md)."""
    return torch.load(FIXTURES / "golden.pt", weights_only=True)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
