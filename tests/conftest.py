import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import pytest
import torch


@pytest.fixture
def float64():
    """Every tensor of a test in float64, restored afterwards (other modules run in
    the same session); a module takes it with
    ``pytestmark = pytest.mark.usefixtures("float64")``."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
