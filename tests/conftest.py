import os

import pytest
import torch

# Two CPU cores on CI: keep each test process to one intra-op thread for stable timings.
torch.set_num_threads(1)
os.environ.setdefault("PYTHONHASHSEED", "0")


@pytest.fixture
def chromium():
    """A headless-capable Chromium binary for the report tests, or skip."""
    import shutil
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium binary found (Debian: apt-get install -y chromium)")


@pytest.fixture
def digits():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return torch.tensor(X / 16.0, dtype=torch.float32), torch.tensor(y)


@pytest.fixture
def one_thread():
    """One intra-op thread for the duration of a test (zoo runs calibrated that way)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
