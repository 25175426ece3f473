"""Every hook is documented, in its docstring and in docs/plugins.md, and so are the Kernel API
and the built-in analyses' fields and options."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from collector import hookspecs

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "plugins.md"


def hook_specs() -> list:
    return [
        value
        for name, value in vars(hookspecs).items()
        if name.startswith(hookspecs.HOOK_PREFIX)
        and callable(value)
        and hasattr(value, f"{hookspecs.PROJECT}_spec")
    ]


HOOKS = hook_specs()


def test_hooks_exist_and_every_collector_function_is_a_spec() -> None:
    names = [h.__name__ for h in HOOKS]
    assert names == ["collector_analyses", "collector_analyze"]
    loose = [
        n
        for n, v in vars(hookspecs).items()
        if n.startswith(hookspecs.HOOK_PREFIX) and callable(v) and v not in HOOKS
    ]
    assert loose == []


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.__name__)
def test_hook_docstring_documents_every_argument_and_the_result(hook) -> None:
    doc = inspect.getdoc(hook)
    assert doc, f"{hook.__name__} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith("."), "the first line is a one-sentence summary"
    params = list(inspect.signature(hook).parameters)
    documented = re.findall(r"^:param (\w+):", doc, re.MULTILINE)
    assert documented == params, "one :param: per argument, in order"
    for name in params:
        text = doc.split(f":param {name}:", 1)[1].split(":param", 1)[0].split(":returns:", 1)[0]
        assert "change" in text, f"{name}: say whether it may be changed"
    assert ":returns:" in doc
    firstresult = getattr(hook, f"{hookspecs.PROJECT}_spec")["firstresult"]
    assert ("Stops at the first non-None result." in doc) == firstresult


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.__name__)
def test_hook_signature_is_typed(hook) -> None:
    signature = inspect.signature(hook)
    assert signature.return_annotation is not inspect.Signature.empty
    for param in signature.parameters.values():
        assert param.annotation is not inspect.Parameter.empty, param.name


@pytest.mark.parametrize("hook", HOOKS, ids=lambda h: h.__name__)
def test_guide_documents_every_hook_and_argument(hook) -> None:
    guide = GUIDE.read_text()
    heading = re.search(rf"^#+ `{hook.__name__}\(([^)]*)\)`", guide, re.MULTILINE)
    assert heading, f"docs/plugins.md has no heading for {hook.__name__}"
    assert [a.strip() for a in heading.group(1).split(",") if a.strip()] == list(
        inspect.signature(hook).parameters
    )


def test_hooks_appear_in_the_guide_in_the_order_they_fire() -> None:
    guide = GUIDE.read_text()
    positions = [guide.index(f"`{h.__name__}(") for h in HOOKS]
    assert positions == sorted(positions)


def section(title: str) -> str:
    guide = GUIDE.read_text()
    start = guide.index(f"\n{title}\n")
    end = guide.find("\n#", start + len(title) + 2)
    return guide[start : end if end >= 0 else None]


def test_guide_names_only_what_the_kernel_has() -> None:
    from collector.image.sparse import SparseMemory
    from collector.kernel.kernel import Kernel

    rows = re.findall(r"^\| `(\w+)", section("## The kernel a plugin gets"), re.MULTILINE)
    assert len(rows) > 20
    # Class attributes, and what __init__ sets (without touching the lazy properties).
    instance = vars(Kernel(SparseMemory({0: bytes(4096)})))
    public = {n for n in [*vars(Kernel), *instance] if not n.startswith("_")}
    assert [name for name in rows if name not in public] == []
    undocumented = public - set(rows) - {"read_u16", "read_u32", "read_u64", "read_s64"}
    assert undocumented == set()


@pytest.mark.parametrize("name", ["sysinfo", "kallsyms"])
def test_guide_documents_every_builtin_field_and_option(name: str) -> None:
    from collector.plugin_manager import PluginManager

    analysis = PluginManager(autoload=False).analysis(name).analysis
    text = section(f"### {name}")
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \|", text, re.MULTILINE)
    assert rows == [(f.name, f.type) for f in analysis.fields]
    options = re.findall(r"^\| `--([\w-]+)", text, re.MULTILINE)
    assert options == [o.name.replace("_", "-") for o in analysis.options]
