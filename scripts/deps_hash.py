"""Print a digest of pyproject.toml's dependency lists (the Makefile remakes .venv when it changes)."""

import hashlib
import json
import sys
from pathlib import Path

text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text(encoding="utf-8")
try:
    import tomllib
except ImportError:  # Python 3.10: the whole file decides
    print(hashlib.sha256(text.encode()).hexdigest()[:16])
    sys.exit(0)
project = tomllib.loads(text)["project"]
deps = [project.get("dependencies", []), project.get("optional-dependencies", {})]
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16])
