"""Build the C extension ``fastmq._core`` from csrc/*.c + src/fastmq/_core.pyx.

Which platforms get the extension
---------------------------------
The C core is Linux-only (futexes, ``F_OFD_*`` record locks,
``posix_fallocate``). So:

* **Linux**: the extension is built, and a failed compile of fastmq's own
  sources fails the install loudly: a Linux user who silently got the 30-40x
  slower pure backend would not know why. Two exceptions build a pure install
  (``fastmq.backend`` is then "pure", and importing fastmq warns once that the
  native backend is missing; ``FASTMQ_BACKEND=pure`` silences that):

  - ``FASTMQ_PURE_ONLY=1``: on purpose;
  - no working C toolchain at all -- a one-line C file that includes
    ``Python.h`` does not compile (no compiler, or no Python headers). The build
    says so in capitals rather than failing, so ``pip install fastmq`` from the
    sdist still gives a working package on a machine without gcc.
* **Anywhere else** (macOS, Windows, BSDs): no extension is attempted and the
  result is a pure-Python install whose ``fastmq.backend`` is "pure".

``FASTMQ_WHEEL_PLATFORM=<platform tag>`` (e.g. ``macosx_10_9_universal2``,
``win_amd64``) tags a pure wheel for that platform only (``py3-none-<tag>``)
instead of ``py3-none-any``: a wheel that installs anywhere would also win over
the sdist on Linux architectures without a binary wheel, which should compile
the C core instead.

Other environment switches (read at build time):

* ``FASTMQ_WERROR=1``        -- add -Werror (CI does; a user's newer compiler
                                 should not fail their install on a new warning).
* ``FASTMQ_SANITIZE=address,undefined`` -- build with those sanitizers and frame
                                 pointers; run the tests with the ASan runtime
                                 preloaded (see .ci/run).
* ``FASTMQ_DEBUG=1``         -- -O0 -g3.

Release builds (neither ``FASTMQ_DEBUG`` nor ``FASTMQ_SANITIZE``) carry no debug
information (``-g0`` and a stripping link, ``-s``): it is most of the ``.so``.

The extension links ``librt`` explicitly: glibc before 2.34 keeps
``shm_open``/``shm_unlink`` there, and without it a wheel built on a new glibc
would need that new glibc (``auditwheel`` would tag it ``manylinux_2_34``).
"""
import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.bdist_wheel import bdist_wheel
from setuptools.command.build_ext import build_ext


def _flag(name):
    return os.environ.get(name, "").strip().lower() not in ("", "0", "no", "false")


def _toolchain_works():
    """Can this machine compile a C file against Python's headers at all?"""
    import sysconfig
    import tempfile
    from distutils.ccompiler import new_compiler  # setuptools' copy on 3.12+
    from distutils.sysconfig import customize_compiler

    cc = new_compiler()
    customize_compiler(cc)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "fastmq_probe.c")
        with open(src, "w") as f:
            f.write("#include <Python.h>\nint fastmq_probe(void) { return 0; }\n")
        try:
            cc.compile([src], output_dir=tmp,
                       include_dirs=[sysconfig.get_paths()["include"]])
        except Exception as exc:  # CompileError, a missing executable, ...
            print(f"fastmq: the C toolchain does not work ({exc})", file=sys.stderr)
            return False
    return True


def _want_extension():
    if not sys.platform.startswith("linux") or _flag("FASTMQ_PURE_ONLY"):
        return False
    if _toolchain_works():
        return True
    print("\n*** fastmq: NO WORKING C COMPILER (or no Python headers): installing the\n"
          "*** PURE-PYTHON backend only, which is much slower. Install gcc and the\n"
          "*** Python headers, then reinstall fastmq (pip install --no-cache-dir).\n",
          file=sys.stderr)
    return False


def _cythonize(extensions):
    try:
        from Cython.Build import cythonize
    except ImportError:  # pragma: no cover - Cython is a build requirement
        sys.exit("fastmq needs Cython>=3 to build its extension (pip install Cython), "
                 "or set FASTMQ_PURE_ONLY=1 for the pure-Python backend only")
    return cythonize(
        extensions,
        language_level=3,
        compiler_directives={"boundscheck": False, "wraparound": False,
                             "embedsignature": True},
    )


def _extensions():
    compile_args = ["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing",
                    "-D_GNU_SOURCE"]
    link_args = []

    if _flag("FASTMQ_WERROR"):
        compile_args.append("-Werror")
    sanitize = os.environ.get("FASTMQ_SANITIZE", "").strip()
    debug = _flag("FASTMQ_DEBUG")
    if debug:
        compile_args += ["-O0", "-g3"]
    if sanitize:
        san = "-fsanitize=" + sanitize
        compile_args += [san, "-fno-omit-frame-pointer", "-g", "-fno-sanitize-recover=undefined"]
        link_args += [san]
    if not debug and not sanitize:
        # Python's own CFLAGS usually carry -g; the last -g option wins.
        compile_args.append("-g0")
        link_args.append("-s")

    core = Extension(
        "fastmq._core",
        sources=["src/fastmq/_core.pyx"] + sorted(glob.glob("csrc/*.c")),
        include_dirs=["csrc"],
        # Cython tracks the included parts itself; listing them (and the C
        # headers) makes a plain rebuild notice an edit to any of them.
        depends=sorted(glob.glob("src/fastmq/_core_parts/*.pxi") + glob.glob("csrc/*.h")),
        # glibc < 2.34 keeps shm_open in librt and pthread_* in libpthread.
        libraries=["rt", "pthread"],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
    )
    return [core]


class build_ext_strict(build_ext):
    """Cythonize when the extension is built, and hold csrc/ to -Werror but not
    Cython's generated ``_core.c``.

    setuptools compiles every source of an Extension with one flag set; the
    generated file is not ours to fix, so only it gets its -Werror removed.
    """

    def finalize_options(self):
        # Cythonize here, not at import: building the sdist or the metadata
        # has no use for the generated C.
        self.distribution.ext_modules[:] = _cythonize(self.distribution.ext_modules)
        super().finalize_options()

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


class bdist_wheel_platform(bdist_wheel):
    """A pure wheel tagged for one platform (FASTMQ_WHEEL_PLATFORM), see above."""

    def get_tag(self):
        python, abi, plat = super().get_tag()
        forced = os.environ.get("FASTMQ_WHEEL_PLATFORM", "").strip()
        if forced and self.root_is_pure:
            return "py3", "none", forced
        return python, abi, plat


setup(
    ext_modules=_extensions() if _want_extension() else [],
    cmdclass={"build_ext": build_ext_strict, "bdist_wheel": bdist_wheel_platform},
)
