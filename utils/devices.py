"""Which device a run trains on (``--gpu``, CUDA_VISIBLE_DEVICES), said in the log, and why a GPU that was asked
for cannot be used, in the words that say what to do: a CPU-only PyTorch, no driver, a GPU too old for this
PyTorch build or held by another process, a NumPy this PyTorch cannot read, a required package not installed."""
from __future__ import annotations

import logging
import os
import shutil
import sys

log = logging.getLogger("nsr")


class DeviceError(RuntimeError):
    """This machine cannot run this PyTorch as installed; said as one sentence, no traceback."""


def devices_asked(gpu: str | None) -> int:
    """How many devices ``--gpu`` asks for (``0,1``: 2; not given: 1)."""
    return len(gpu.split(",")) if gpu else 1


def choose_devices(gpu: str | None):
    """(accelerator, number of devices). CUDA_VISIBLE_DEVICES must be set before torch touches CUDA.

    A CUDA_VISIBLE_DEVICES set before launch (a scheduler's allocation, e.g. SLURM's) is kept: ``--gpu`` then
    only says how many of those devices to use."""
    problem = numpy_too_new_for_torch()
    if problem:
        raise DeviceError(problem)
    preset = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu is not None and preset is None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    import torch

    if torch.cuda.is_available():
        problem = unusable_gpu(torch)
        if problem:
            raise DeviceError(problem)
        wanted, visible = devices_asked(gpu), torch.cuda.device_count()
        if gpu is not None and preset is not None and preset.replace(" ", "") != gpu:
            log.warning(f"CUDA_VISIBLE_DEVICES={preset} was set before launch and is kept; --gpu {gpu} only says "
                        f"how many of its devices to use ({wanted}).")
        if wanted > visible:
            log.warning(f"--gpu {gpu} asks for {wanted} GPUs but CUDA shows {visible}: training on {visible}.")
        n = min(wanted, visible)
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
        log.info(f"Device: {n} CUDA GPU(s) ({names}), mixed precision where the config asks for it")
        return "gpu", n
    if gpu is not None:
        log.warning(f"--gpu {gpu} was given but {why_no_cuda(torch)}: running on the CPU instead (fp32).")
    else:
        log.info("Device: CPU (no CUDA device found), fp32")
    return "cpu", 1


def numpy_too_new_for_torch() -> str | None:
    """Why the installed PyTorch cannot use the installed NumPy (None when it can), from the packages' versions,
    before torch is imported: PyTorch < 2.3 was built for NumPy 1, and with NumPy 2 (which a fresh
    ``pip install -r requirements.txt`` beside a kept older PyTorch brings in) it prints a page of import warnings
    and every loader then fails at ``torch.from_numpy`` ("Numpy is not available")."""
    from importlib import metadata

    def major_minor(package: str):
        try:
            return tuple(int(part) for part in metadata.version(package).split(".")[:2])
        except (metadata.PackageNotFoundError, ValueError):  # not installed by pip, or an unusual version string
            return None

    torch_version, numpy_version = major_minor("torch"), major_minor("numpy")
    if torch_version is None or numpy_version is None or torch_version >= (2, 3) or numpy_version < (2, 0):
        return None
    return (f"PyTorch {metadata.version('torch')} was built for NumPy 1 and cannot use the installed NumPy "
            f"{metadata.version('numpy')} (PyTorch reads NumPy 2 from 2.3 on); run pip install 'numpy<2' "
            "'opencv-python-headless<4.12', or install PyTorch 2.3 or newer.")


# the pip package of each module requirements.txt brings that the code imports, by its import name
REQUIRED_MODULES = {"torch": "torch", "pytorch_lightning": "pytorch-lightning", "lightning_fabric": "pytorch-lightning",
                    "omegaconf": "omegaconf", "yaml": "omegaconf", "numpy": "numpy", "trimesh": "trimesh",
                    "mcubes": "PyMCubes", "cv2": "opencv-python-headless", "imageio": "imageio", "PIL": "pillow",
                    "imageio_ffmpeg": "imageio-ffmpeg", "tensorboard": "tensorboard", "torchmetrics": "torchmetrics",
                    "tqdm": "tqdm", "scipy": "scipy", "pycolmap": "pycolmap", "xatlas": "xatlas",
                    "fast_simplification": "fast-simplification"}


def missing_requirement(err: ModuleNotFoundError) -> str | None:
    """What to do when ``err`` is a package of requirements.txt that this Python lacks (None for any other
    module): the requirements not installed yet, installed for another Python (a venv or conda environment
    not activated), or a Python older than the packages' wheels (pip then installs none of them)."""
    package = REQUIRED_MODULES.get((err.name or "").split(".")[0])
    if package is None:
        return None
    python = f"Python {sys.version_info.major}.{sys.version_info.minor} at {sys.executable}"
    if sys.version_info < (3, 10):
        return (f"{package} is not installed for {python}; this project needs Python 3.10 or newer (pycolmap has no "
                "wheels for older ones, so pip installs none of the requirements): run it with a newer Python.")
    return (f"{package} is not installed for {python}; install the requirements into it with: {sys.executable} -m "
            "pip install -r requirements.txt (or activate the environment they were installed in).")


def unusable_gpu(torch) -> str | None:
    """Why this process's CUDA device cannot run this PyTorch's kernels (None when it can), found with one tiny kernel
    before the model is built: a GPU older than the build supports ("no kernel image is available"), or one
    another process holds in exclusive mode ("busy or unavailable")."""
    index = int(os.environ.get("LOCAL_RANK", 0))  # a DDP rank checks its own device, making no context on GPU 0
    try:
        torch.ones(1, device=f"cuda:{index}").add_(1).cpu()
        return None
    except RuntimeError as err:
        name, (major, minor) = torch.cuda.get_device_name(index), torch.cuda.get_device_capability(index)
        cpu_run = "to run on the CPU instead, start with CUDA_VISIBLE_DEVICES= (empty)"
        built = sorted(int(a[3:]) for a in torch.cuda.get_arch_list() if a.startswith("sm_"))
        if built and 10 * major + minor < built[0]:
            return (f"GPU {name} (compute capability {major}.{minor}) is older than this PyTorch "
                    f"{torch.__version__} supports (sm_{built[0]} and newer); install a PyTorch build for it "
                    f"(https://pytorch.org/get-started/previous-versions/), or, {cpu_run}.")
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"CUDA cannot run on GPU {name} ({reason}); check nvidia-smi, or, {cpu_run}."


def why_no_cuda(torch) -> str:
    """Why CUDA has no device for this run, in the words that say what to do: the commonest cause on a GPU
    machine is a CPU-only PyTorch wheel, then a device number the machine does not have."""
    if torch.version.cuda is None:
        return (f"this PyTorch ({torch.__version__}) is a CPU-only build; install a CUDA build of PyTorch "
                "(https://pytorch.org/get-started/locally/) to train on the GPU")
    if not os.path.exists("/proc/driver/nvidia/version") and shutil.which("nvidia-smi") is None:
        return "no NVIDIA driver is loaded on this machine"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return (f"CUDA sees no device among CUDA_VISIBLE_DEVICES={visible!r}; give device numbers that nvidia-smi "
            "lists (and check that the driver matches this PyTorch's CUDA " + str(torch.version.cuda) + ")")
