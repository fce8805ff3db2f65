"""Sphinx configuration of the numpyro_svgp documentation.

Build (from the repository root, no network needed)::

    .venv/bin/pip install -e ".[docs]"
    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

``NUMPYRO_SVGP_DOCS_FAST=1`` builds the API reference, the performance pages and the
first tutorial only (a quick check while editing); without it every tutorial is
executed, as in CI. Executed notebooks
are cached in ``docs/_build/.jupyter_cache``: a tutorial runs again only when its code
changes.
"""

import os
import sys

from docutils import nodes
from sphinx.errors import PycodeError
from sphinx.pycode import ModuleAnalyzer
from sphinx.util import logging

import numpyro_svgp

logger = logging.getLogger(__name__)

# -- project ------------------------------------------------------------------------------
project = "numpyro_svgp"
author = "the numpyro_svgp authors"
copyright = "the numpyro_svgp authors, Apache-2.0"
release = version = numpyro_svgp.__version__

# -- general ------------------------------------------------------------------------------
extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.mathjax",
    "myst_nb",
]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb"}
exclude_patterns = ["_build", "jupyter_execute", "README.md", ".jupyter_cache"]

# Fast mode executes the first tutorial only; the rest need NUMPYRO_SVGP_DOCS_FAST
# unset. The tutorials' toctree is a glob, so excluded ones
# simply drop out of it.
FAST = os.environ.get("NUMPYRO_SVGP_DOCS_FAST", "") not in ("", "0")
FAST_TUTORIAL = "tutorials/01_regression.md"
if FAST:
    exclude_patterns += [
        f"tutorials/{name}"
        for name in sorted(os.listdir(os.path.join(os.path.dirname(__file__), "tutorials")))
        if name.endswith(".md") and name != "index.md" and f"tutorials/{name}" != FAST_TUTORIAL
    ]

# No intersphinx: the build must work without network. References to jax, numpyro and
# arviz objects in the docstrings render as plain code (nitpicky stays off).
nitpicky = False

# -- autodoc --------------------------------------------------------------------------------
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# types for the parameters a docstring documents (a NamedTuple's fields are documented
# as attributes, not repeated as parameters)
autodoc_typehints_description_target = "documented_params"
autodoc_typehints_format = "short"
autodoc_preserve_defaults = True
autosummary_generate = False
# the objects live in private modules and are documented under the names users type
add_module_names = False

# -- MyST / myst-nb -------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3
nb_execution_mode = "cache"
nb_execution_raise_on_error = True
nb_execution_timeout = 300  # seconds per cell
nb_execution_show_tb = True
nb_merge_streams = True

# The tutorials' kernels inherit this environment. OpenBLAS's threads compete with XLA's
# on CPU (see the README).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
# numpyro imports tqdm.auto, which warns in a Jupyter kernel without ipywidgets; the
# tutorials show no progress bars, so the warning says nothing to a reader.
os.environ["PYTHONWARNINGS"] = ",".join(
    w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found") if w
)
# The tutorials' problems are small, so their time goes to compiling, not running: XLA's
# backend optimisations are turned down for them, which shortens each fit's compilation by
# about a third. The maths is the same; round-off may differ in the last digits.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    ).strip()

# -- HTML -----------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"numpyro_svgp {release}"
html_static_path = []


# -- checks and fixes done by configuration --------------------------------------------
def _attribute_docs(app, what, name, obj, options, lines):
    """Re-exported module-level data (``MAX_JITTER_ESCALATIONS``, the alias
    ``EpochsResult``) has its docstring in the private module that defines it, where
    autodoc does not look: it shows the docstring of the value's type instead. Take the
    one from the defining module."""
    if what != "data" or not name.startswith("numpyro_svgp."):
        return
    attr = name.rsplit(".", 1)[1]
    for module_name in sorted(m for m in sys.modules if m.startswith("numpyro_svgp._")):
        try:
            docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
        except PycodeError:  # a module without source: look further
            continue
        if ("", attr) in docs:
            lines[:] = list(docs[("", attr)])
            return


def _short_array_names(app, doctree):
    """jaxtyping spells ``jax.Array`` by its implementation's path in annotations
    (``Float[jaxlib._jax.Array, 'N D']``); show it as users write it."""
    for node in list(doctree.findall(nodes.Text)):
        if "jaxlib._jax.Array" in node:
            node.parent.replace(node, nodes.Text(node.replace("jaxlib._jax.Array", "Array")))


def _check_api_complete(app, env):
    """Fail the build (a warning, and -W) when a public name is not documented."""
    documented = set(env.get_domain("py").objects)
    wanted = {f"numpyro_svgp.{name}" for name in numpyro_svgp.__all__ if name != "kernels"}
    wanted |= {f"numpyro_svgp.kernels.{name}" for name in numpyro_svgp.kernels.__all__}
    wanted.add("numpyro_svgp.kernels")
    for name in sorted(wanted - documented):
        logger.warning("%s is public but not in the API reference (docs/api.rst)", name)


def setup(app):
    app.connect("autodoc-process-docstring", _attribute_docs)
    app.connect("doctree-read", _short_array_names)
    app.connect("env-updated", _check_api_complete)
