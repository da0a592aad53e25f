"""Names that moved out of a module stay importable from it, with a DeprecationWarning
naming their new home, and are the very objects the new home holds."""
import importlib

import pytest

MOVED = [
    ("milvus_ltr_router.milvus_io", "describe", "milvus_ltr_router.schema"),
    ("milvus_ltr_router.milvus_io", "clone_schema", "milvus_ltr_router.schema"),
    ("milvus_ltr_router.milvus_io", "iter_columns", "milvus_ltr_router.scan"),
    ("milvus_ltr_router.milvus_io", "SCAN_ROWS", "milvus_ltr_router.scan"),
    ("milvus_ltr_router.milvus_io", "take_rows", "milvus_ltr_router.columns"),
    ("milvus_ltr_router.milvus_io", "ParallelWriter", "milvus_ltr_router.writer"),
    ("milvus_ltr_router.milvus_io", "create_vector_collection", "milvus_ltr_router.writer"),
    ("milvus_ltr_router.layout", "iter_layout_blocks", "milvus_ltr_router.readout"),
    ("milvus_ltr_router.layout", "build_layout", "milvus_ltr_router.build"),
    ("milvus_ltr_router.layout", "BuildReport", "milvus_ltr_router.build"),
    ("milvus_ltr_router.layout", "adopt_layout", "milvus_ltr_router.repair"),
    ("milvus_ltr_router.layout", "stray_rows", "milvus_ltr_router.repair"),
    ("milvus_ltr_router.layout", "move_stray_rows", "milvus_ltr_router.repair"),
]


@pytest.mark.parametrize("old, name, home", MOVED)
def test_moved_name_warns_and_is_the_new_object(old, name, home):
    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=rf"{old}\.{name} has moved: import it from {home}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(home), name)


def test_from_import_of_a_moved_name_warns():
    with pytest.warns(DeprecationWarning, match="milvus_ltr_router.writer"):
        from milvus_ltr_router.milvus_io import ParallelWriter  # noqa: F401
    with pytest.warns(DeprecationWarning, match="milvus_ltr_router.build"):
        from milvus_ltr_router.layout import build_layout  # noqa: F401
    with pytest.warns(DeprecationWarning, match="milvus_ltr_router.repair"):
        from milvus_ltr_router import layout
        layout.adopt_layout


def test_names_that_stayed_do_not_warn(recwarn):
    from milvus_ltr_router.milvus_io import release_lite, is_lite_uri  # noqa: F401
    from milvus_ltr_router.layout import Layout, LayoutError, read_layout, cluster_sizes  # noqa: F401
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning)]


@pytest.mark.parametrize("old", ["milvus_ltr_router.milvus_io", "milvus_ltr_router.layout"])
def test_unknown_name_is_still_an_attribute_error(old):
    module = importlib.import_module(old)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        module.no_such_name
    assert not hasattr(module, "no_such_name")


@pytest.mark.parametrize("old, above", [
    ("milvus_ltr_router.layout", ["readout", "build", "repair"]),
    ("milvus_ltr_router.milvus_io", ["schema", "columns", "scan", "writer"]),
])
def test_old_modules_import_none_of_the_new_homes_at_load_time(old, above):
    """The deprecation path is lazy: importing the old module loads none of the new homes."""
    import subprocess
    import sys
    names = [f"milvus_ltr_router.{m}" for m in above]
    code = f"import sys, {old}; print(sorted(m for m in sys.modules if m in {names!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
