"""Suite-wide fixtures: keep the suite's disk footprint to one module's worth.

Encoder weight files are 0.1-0.5 GB and fine-tuning checkpoints twice that. pyproject's
``tmp_path_retention_policy = "failed"`` deletes a passing test's ``tmp_path``; the folders
that module fixtures make with ``tmp_path_factory.mktemp`` would otherwise live until the
session ends (2.5 GB in the default suite), so they go when their module is done. A folder
shared by several modules for the whole session is named ``session_...`` and stays.
"""
import shutil

import pytest


@pytest.fixture(scope="module", autouse=True)
def _drop_module_scratch(request, tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    before = set(base.iterdir())
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return  # a failure in this module: keep everything for the post-mortem
    for path in set(base.iterdir()) - before:
        # A test's own tmp_path is named after it ("test_..."); the retention policy owns those.
        if path.is_dir() and not path.is_symlink() and not path.name.startswith(("test_", "session_")):
            shutil.rmtree(path, ignore_errors=True)
