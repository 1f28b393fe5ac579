"""Build the single C extension ``fastmq._core`` from csrc/*.c + src/fastmq/_core.pyx.

Environment switches (read at build time):

* ``FASTMQ_WERROR=1``        -- add -Werror (CI does; a user's newer compiler
                                 should not fail their install on a new warning).
* ``FASTMQ_SANITIZE=address,undefined`` -- build with those sanitizers and frame
                                 pointers; run the tests with the ASan runtime
                                 preloaded (see .ci/run).
* ``FASTMQ_DEBUG=1``         -- -O0 -g.
"""
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

try:
    from Cython.Build import cythonize
except ImportError:  # pragma: no cover - Cython is a build requirement
    sys.exit("fastmq needs Cython>=3 to build (pip install Cython)")


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false")


compile_args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing",
                "-D_GNU_SOURCE"]
link_args = []
macros = []

if _flag("FASTMQ_WERROR"):
    compile_args.append("-Werror")
if _flag("FASTMQ_DEBUG"):
    compile_args += ["-O0", "-g3"]

sanitize = os.environ.get("FASTMQ_SANITIZE", "").strip()
if sanitize:
    san = "-fsanitize=" + sanitize
    compile_args += [san, "-fno-omit-frame-pointer", "-g", "-fno-sanitize-recover=undefined"]
    link_args += [san]

core = Extension(
    "fastmq._core",
    sources=["src/fastmq/_core.pyx"] + sorted(glob.glob("csrc/*.c")),
    include_dirs=["csrc"],
    define_macros=macros,
    extra_compile_args=compile_args,
    extra_link_args=link_args,
)


class build_ext_strict(build_ext):
    """Hold csrc/ to -Werror but not Cython's generated ``_core.c``.

    setuptools compiles every source of an Extension with one flag set; the
    generated file is not ours to fix, so only it gets its -Werror removed.
    """

    def build_extension(self, ext):
        original = self.compiler._compile

        def _compile(obj, src, ext_, cc_args, extra_postargs, pp_opts):
            if src.endswith("_core.c"):
                extra_postargs = [a for a in extra_postargs if a != "-Werror"] + [
                    "-Wno-unused-function", "-Wno-unused-parameter",
                    "-Wno-missing-field-initializers", "-Wno-unreachable-code"]
            return original(obj, src, ext_, cc_args, extra_postargs, pp_opts)

        self.compiler._compile = _compile
        try:
            super().build_extension(ext)
        finally:
            self.compiler._compile = original


setup(
    ext_modules=cythonize(
        [core],
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False,
                             "embedsignature": True},
    ),
    cmdclass={"build_ext": build_ext_strict},
)
