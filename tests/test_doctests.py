"""The docstring examples run (doctest): an example that stops working fails
the suite. Examples that need a dataset or a trained model say
`# doctest: +SKIP` on the lines that do; every module listed here must still
run at least one example."""

import doctest
import importlib
import pkgutil

import pytest

import deel_lipdp_ext

# Importing `__main__` runs the command line.
NOT_IMPORTED = {"deel_lipdp_ext.__main__"}
FLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


def _module_names() -> list[str]:
    names = [deel_lipdp_ext.__name__]
    for info in pkgutil.walk_packages(
        deel_lipdp_ext.__path__, prefix=f"{deel_lipdp_ext.__name__}."
    ):
        if info.name not in NOT_IMPORTED:
            names.append(info.name)
    return names


def _runnable_examples(tests) -> int:
    return sum(
        1
        for test in tests
        for example in test.examples
        if not example.options.get(doctest.SKIP, False)
    )


def _doctests(name: str):
    module = importlib.import_module(name)
    return [
        t
        for t in doctest.DocTestFinder().find(module, name)
        # objects imported from elsewhere are tested in their own module
        if t.examples and t.filename == getattr(module, "__file__", None)
    ]


MODULES = [name for name in _module_names() if _doctests(name)]


def test_the_package_has_docstring_examples():
    """Guard against a harness that collects nothing."""
    assert len(MODULES) >= 12, MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    tests = _doctests(name)
    assert _runnable_examples(tests) > 0, f"{name}: every example is skipped"
    runner = doctest.DocTestRunner(optionflags=FLAGS)
    for test in tests:
        runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.failed == 0, f"{results.failed} example(s) failed in {name}"
