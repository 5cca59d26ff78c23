"""Build of efcn_sparse and its extension ``efcn_sparse._C``.

* C++ CPU kernels (``csrc/*.cpp``, ``csrc/cpu/*.cpp``): always, unless ``EFCN_NO_EXT=1``.
* CUDA kernels (``csrc/cuda/*.cu``): when torch is a CUDA build and a CUDA toolkit is found,
  for sm_80 and sm_90, unless ``EFCN_NO_CUDA=1``. No GPU is needed at build time.
* ``EFCN_SANITIZE=1`` builds the CPU code with AddressSanitizer and UBSan.

Install with ``pip install -e . --no-build-isolation`` (the build uses the installed torch).
"""

import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    # the `nvcc` on PATH may be a wrapper, which misleads torch's guess: prefer the real toolkit
    if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _extensions():
    if os.environ.get("EFCN_NO_EXT") == "1":
        return [], {}
    _find_cuda_home()
    import torch
    from torch.utils import cpp_extension as ce

    rel = lambda paths: sorted(os.path.relpath(p, ROOT) for p in paths)  # noqa: E731
    sources = rel(glob.glob(os.path.join(ROOT, "csrc", "*.cpp")) + glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = rel(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")) + glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cpp")))
    use_cuda = (os.environ.get("EFCN_NO_CUDA") != "1" and torch.version.cuda is not None
                and ce.CUDA_HOME is not None and bool(cuda_sources))
    sanitize = os.environ.get("EFCN_SANITIZE") == "1"
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    link = ["-fopenmp"]
    if sanitize:
        cxx = ["-O1", "-g", "-fopenmp", "-fsanitize=address,undefined", "-fno-omit-frame-pointer"]
        link += ["-fsanitize=address,undefined"]
    macros = []
    extra = {"cxx": cxx}
    if use_cuda:
        macros.append(("EFCN_WITH_CUDA", None))
        extra["nvcc"] = [
            "-O3", "--expt-relaxed-constexpr", "-lineinfo", "-Xptxas=-v",
            "-gencode=arch=compute_80,code=sm_80",
            "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90",
        ]
        ext = ce.CUDAExtension("efcn_sparse._C", sources + cuda_sources, extra_compile_args=extra,
                               extra_link_args=link, define_macros=macros)
    else:
        ext = ce.CppExtension("efcn_sparse._C", sources, extra_compile_args=extra, extra_link_args=link,
                              define_macros=macros)
    return [ext], {"build_ext": ce.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()

setup(
    name="efcn_sparse",
    version="0.1.0",
    description="Block-sparse equivalent fully-connected networks (eFCN) of CNNs, with CPU, Triton and CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["efcn_sparse", "efcn_sparse.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scipy"],
    extras_require={"triton": ["triton"], "plots": ["matplotlib", "tqdm"]},
    entry_points={"console_scripts": ["efcn=efcn_sparse.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
