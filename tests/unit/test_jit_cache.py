"""The kernel cache: keyed on every source of the package, placed under HVJIT_CACHE_DIR,
and really hit by a second process, which loads it without refreshing Numba's target."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

import pytest

from hvjit import _jit

PROBE = """
import json, sys
from hvjit._jit import CACHE_DIR
from hvjit.kernels.gipclock import ticks_to_ns
value = int(ticks_to_ns(2_600_000, 2_600_000))
print(json.dumps({"dir": str(CACHE_DIR), "hits": sum(ticks_to_ns.stats.cache_hits.values()),
                  "misses": sum(ticks_to_ns.stats.cache_misses.values()), "value": value,
                  "refreshed": "numba.np.arraymath" in sys.modules}))
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
    assert first["value"] == second["value"] == 1_000_000
    # A compilation refreshes Numba's CPU target (every typing/lowering registry); a cache
    # load of an hvjit kernel does not need to (hvjit._jit._load_overload).
    assert first["refreshed"] and not second["refreshed"]


def test_stat_keyed_digest_follows_edits(tmp_path):
    base, root = tmp_path / "cache", tmp_path / "src"
    root.mkdir()
    (root / "a.py").write_text("x = 1\n")
    assert _jit.cached_sources_digest(base, root) == _jit.sources_digest(root)
    assert _jit.cached_sources_digest(base, root) == _jit.sources_digest(root)  # from the memo
    os.utime(root / "a.py", ns=(1, 1))
    (root / "a.py").write_text("x = 2\n")
    assert _jit.cached_sources_digest(base, root) == _jit.sources_digest(root)
    (root / "b.py").write_text("")
    assert _jit.cached_sources_digest(base, root) == _jit.sources_digest(root)


# What object code loaded without the target refresh may link against: the Python C API,
# Numba's helper library and runtime (NRT), and the trampoline.
ALLOWED_PREFIXES = ("Py", "_Py", "NRT_", "numba_", "hvt_")


def _cached_objects(root):
    for path in root.rglob("*.nbc"):
        try:
            data = pickle.loads(path.read_bytes())
        except Exception:  # noqa: BLE001 - a generated run loop's module is not importable here
            continue
        stack = [data]
        while stack:
            item = stack.pop()
            if isinstance(item, (bytes, bytearray)) and item[:4] == b"\x7fELF":
                yield path, bytes(item)
            elif isinstance(item, (tuple, list)):
                stack.extend(item)
            elif isinstance(item, dict):
                stack.extend(item.values())


@pytest.mark.skipif(shutil.which("nm") is None, reason="nm (binutils) not installed")
def test_cached_kernels_link_only_against_what_a_cache_load_provides():
    if not _jit.CACHE_DIR.exists():
        pytest.skip("no kernel cache yet")
    seen = 0
    for path, obj in _cached_objects(_jit.CACHE_DIR):
        with tempfile.NamedTemporaryFile(suffix=".o") as f:
            f.write(obj)
            f.flush()
            undefined = subprocess.run(["nm", "-u", f.name], capture_output=True, text=True, check=True).stdout.split()
        seen += 1
        stray = [s for s in undefined if s != "U" and not s.startswith(ALLOWED_PREFIXES)]
        assert not stray, f"{path.name} needs {stray}: load it with the target refreshed"
    if not seen:
        pytest.skip("no cached kernel objects yet")
