"""Project-wide rules that a grep can check: no pickle, imports flow one way."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["comm", "parallel", "stages", "runtime"]
PICKLE = re.compile(r"^\s*(import\s+(c?pickle|cloudpickle|dill)|from\s+(c?pickle|cloudpickle|dill)\s+import)|pickle\.loads?\(|"
                    r"torch\.load\(|dist\.(broadcast|all_gather|gather|scatter)_object",
                    re.M)


def _sources(*pkgs):
    for pkg in pkgs:
        yield from sorted((ROOT / pkg).rglob("*.py"))


def test_no_pickle_anywhere():
    offenders = [f"{p.relative_to(ROOT)}: {m.group(0).strip()}"
                 for p in _sources(*PACKAGES, "tools")
                 for m in PICKLE.finditer(p.read_text())]
    assert offenders == []


def test_imports_flow_down():
    higher = {"comm": PACKAGES[1:], "parallel": PACKAGES[2:], "stages": PACKAGES[3:], "runtime": []}
    bad = []
    for pkg, forbidden in higher.items():
        for p in _sources(pkg):
            for up in forbidden:
                if re.search(rf"^\s*(from|import)\s+(omni_runtime\.)?{up}\b", p.read_text(), re.M):
                    bad.append(f"{p.relative_to(ROOT)} imports {up}")
    assert bad == []


def test_pickle_rule_catches_a_violation():
    assert PICKLE.search("import pickle\n") and PICKLE.search("x = pickle.loads(b)")
    assert PICKLE.search("dist.broadcast_object_list(objs)") and PICKLE.search("torch.load(f)")
    assert not PICKLE.search("import msgspec\n")
