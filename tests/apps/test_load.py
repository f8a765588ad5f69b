"""`fcache.load` is there without making `import fcache` heavy."""

from __future__ import annotations

import subprocess
import sys


def test_import_fcache_stays_light_and_load_is_lazy():
    code = "import sys, fcache; assert 'torch' not in sys.modules; f = fcache.load; assert 'torch' in sys.modules and callable(f)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
