"""The kernel cache: keyed on every source of the package, placed under HVJIT_CACHE_DIR,
and really hit by a second process."""

import json
import os
import subprocess
import sys

from hvjit import _jit

PROBE = """
import json, sys
from hvjit._jit import CACHE_DIR
from hvjit.kernels.gipclock import ticks_to_ns
ticks_to_ns(2_600_000, 2_600_000)
print(json.dumps({"dir": str(CACHE_DIR), "hits": sum(ticks_to_ns.stats.cache_hits.values()),
                  "misses": sum(ticks_to_ns.stats.cache_misses.values())}))
"""


def _probe(cache_dir):
    env = dict(os.environ, HVJIT_CACHE_DIR=str(cache_dir))
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_digest_follows_every_source(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    before = _jit.sources_digest(tmp_path)
    assert _jit.sources_digest(tmp_path) == before
    (tmp_path / "sub" / "b.py").write_text("y = 3\n")  # a helper in another module changed
    assert _jit.sources_digest(tmp_path) != before
    (tmp_path / "sub" / "b.py").write_text("y = 2\n")
    assert _jit.sources_digest(tmp_path) == before
    (tmp_path / "c.py").write_text("")  # a new module changes it too
    assert _jit.sources_digest(tmp_path) != before


def test_cache_lives_under_the_digest_and_is_hit_by_the_next_process(tmp_path):
    first = _probe(tmp_path)
    assert first["dir"] == str(tmp_path / f"numba-{_jit.sources_digest()}")
    assert first["misses"] == 1 and first["hits"] == 0
    cached = [p for p in (tmp_path).rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert any("gipclock" in p.name for p in cached)  # hvjit's locator put it there
    second = _probe(tmp_path)
    assert second["hits"] == 1 and second["misses"] == 0
