"""Loads the compiled extension once; importing it registers the ops under torch.ops.fastelbo."""
import torch  # noqa: F401  (torch's libraries must be loaded before the extension)

try:
    from . import _C
except ImportError as error:  # pragma: no cover - only when the package was not built
    raise ImportError(
        "fastelbo's compiled kernels (fastelbo._C) are not built or do not match this torch: "
        "run `make install`, or `pip install --no-build-isolation -e .` in the source tree. "
        f"Original error: {error}"
    ) from error

BUILT_WITH_CUDA: bool = bool(_C.built_with_cuda)
