import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared"))
FIXTURES = os.path.join(SHARED, "fixtures", "xpiwit")


@pytest.fixture
def xpiwit_fixture():
    """Path of a file in ../shared/fixtures/xpiwit (skips when the folder is absent)."""
    def get(name):
        path = os.path.join(FIXTURES, name)
        if not os.path.exists(path):
            pytest.skip(f"fixture {path} not available")
        return path
    return get
